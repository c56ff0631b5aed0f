"""Inference economics: catalogs, roofline arithmetic, per-request cost ledger, fleet planner.

Pure Python (stdlib + json). numpy/torch are imported lazily by ``host.measure_host`` only,
matplotlib by ``plan_cli.plot_cost_vs_batch`` only. See docs/economics.md for the formulas.
"""

from .analytics import (
    ParamCount, StepEstimate, Throughput, cost_per_million_from_step,
    cost_per_million_output_tokens, decode_floor, decode_throughput, embedding_bytes,
    kv_bytes_for_context, kv_bytes_per_token, max_batch, min_tp_to_fit, param_count,
    prefill_flops, ridge_point, roofline_step, step_time_seconds, streamed_weight_bytes,
    weight_bytes,
)
from .catalog import (
    CatalogError, HardwareSpec, ModelSpec, hardware_names, load_hardware, load_model,
    model_from_hf_config, model_names,
)
from .serving import (
    CachedSessionPrice, cached_session_input_price, draft_cost_ratio_for_speedup,
    kv_transfer_seconds, speculative_expected_tokens, speculative_speedup,
)
from .fleet import FleetPlan, Workload, euv_ceiling_gw_per_year, euv_sensitivity, \
    load_workload, size_fleet
from .ledger import ApiPrices, CostLedger, LedgerTotals, RequestCost, TokenUsage, api_price
from .simulated import SimulatedExecutor

__all__ = [
    "ApiPrices", "CachedSessionPrice", "CatalogError", "CostLedger", "FleetPlan",
    "HardwareSpec", "LedgerTotals", "ModelSpec", "ParamCount", "RequestCost", "SimulatedExecutor",
    "StepEstimate",
    "Throughput", "TokenUsage", "Workload", "api_price", "cached_session_input_price",
    "cost_per_million_from_step", "cost_per_million_output_tokens", "decode_floor",
    "decode_throughput", "draft_cost_ratio_for_speedup", "embedding_bytes",
    "euv_ceiling_gw_per_year", "euv_sensitivity", "hardware_names", "kv_bytes_for_context",
    "kv_bytes_per_token", "kv_transfer_seconds", "load_hardware", "load_model",
    "load_workload", "max_batch", "min_tp_to_fit", "model_from_hf_config", "model_names",
    "param_count", "prefill_flops", "ridge_point", "roofline_step", "size_fleet",
    "speculative_expected_tokens", "speculative_speedup", "step_time_seconds",
    "streamed_weight_bytes", "weight_bytes",
]
