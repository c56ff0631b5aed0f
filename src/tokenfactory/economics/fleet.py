"""Fleet sizing: accelerators, racks, megawatts and dollars to serve a tokens-per-day demand.

Per request (the seed's ``Cost/token = [(1 - hit_rate) x prefill_cost + decode_cost] / batch``):

    prefill GPU-seconds = FLOPs(uncached input after the cached prefix) / (peak x prefill_mfu)
    decode GPU-seconds  = output_tokens x decode_step_seconds x tp / batch

and the fleet is the daily GPU-seconds / 86,400 / utilization, rounded up to whole replicas.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

from .analytics import decode_floor, max_batch, prefill_flops
from .catalog import CatalogError, HardwareSpec, ModelSpec, workload_table

SECONDS_PER_DAY = 86_400.0
HOURS_PER_YEAR = 8_760.0


@dataclass(frozen=True)
class Workload:
    name: str
    input_tokens: int
    output_tokens: int
    cache_hit_rate: float
    batch: int
    source: str = ""


def load_workload(name: str) -> Workload:
    table = workload_table()
    entry = table.get(name.lower())
    if entry is None:
        raise CatalogError(f"unknown workload {name!r}; valid: {', '.join(table)}")
    return Workload(name=name.lower(), input_tokens=int(entry["input_tokens"]),
                    output_tokens=int(entry["output_tokens"]),
                    cache_hit_rate=float(entry["cache_hit_rate"]), batch=int(entry["batch"]),
                    source=entry.get("source", ""))


@dataclass(frozen=True)
class FleetPlan:
    workload: str
    demand_tokens_per_day: float
    requests_per_day: float
    tp: int
    batch: int
    decode_context: int
    prefill_gpu_seconds_per_request: float
    decode_gpu_seconds_per_request: float
    gpus: int
    replicas: int
    racks: int
    it_megawatts: float
    facility_megawatts: float
    capex_usd: float
    energy_usd_per_year: float
    rental_usd_per_year: float
    cost_per_million_tokens: float       # rental-equivalent, blended input+output
    utilization: float

    def to_dict(self) -> dict:
        return asdict(self)


def size_fleet(model: ModelSpec, hardware: HardwareSpec, demand_tokens_per_day: float,
               workload: Workload, tp: int = 1, precision: str = "bf16",
               kv_dtype: Optional[str] = None, batch: Optional[int] = None,
               cost_per_hour: Optional[float] = None, utilization: float = 0.6,
               prefill_mfu: float = 0.5, pue: float = 1.2,
               energy_usd_per_kwh: float = 0.08) -> FleetPlan:
    """Size a fleet for ``demand_tokens_per_day`` tokens (input + output) of ``workload``.

    Defaults: 60% average utilization (the seed's 60-70% GPU utilization), prefill at 50% MFU
    (the seed's 50-70%), PUE 1.2, $0.08/kWh."""
    if demand_tokens_per_day <= 0:
        raise ValueError("demand must be positive")
    if not 0 < utilization <= 1 or not 0 < prefill_mfu <= 1:
        raise ValueError("utilization and prefill_mfu must be in (0, 1]")
    tokens_per_request = workload.input_tokens + workload.output_tokens
    requests = demand_tokens_per_day / tokens_per_request
    context = workload.input_tokens + workload.output_tokens // 2    # mean context in decode
    fits = max_batch(model, hardware, context, tp, precision, kv_dtype)
    if fits < 1:
        raise ValueError(f"{model.name} with a {context}-token context does not fit on "
                         f"{tp} x {hardware.key}")
    b = min(batch or workload.batch, fits)

    cached = int(workload.input_tokens * workload.cache_hit_rate)
    flops = prefill_flops(model, workload.input_tokens - cached, cached)
    prefill_s = flops / (hardware.peak_flops(precision) * prefill_mfu)
    step = decode_floor(model, hardware, b, context, tp, precision, kv_dtype)
    decode_s = workload.output_tokens * step.seconds * tp / b

    gpu_seconds = requests * (prefill_s + decode_s)
    replicas = max(1, math.ceil(gpu_seconds / SECONDS_PER_DAY / utilization / tp))
    gpus = replicas * tp
    racks = math.ceil(gpus / hardware.rack_accelerators)
    it_mw = gpus * hardware.watts_per_accelerator_in_rack / 1e6
    facility_mw = it_mw * pue
    rate = hardware.cost_per_hour if cost_per_hour is None else cost_per_hour
    rental = gpus * rate * HOURS_PER_YEAR
    return FleetPlan(
        workload=workload.name, demand_tokens_per_day=demand_tokens_per_day,
        requests_per_day=requests, tp=tp, batch=b, decode_context=context,
        prefill_gpu_seconds_per_request=prefill_s, decode_gpu_seconds_per_request=decode_s,
        gpus=gpus, replicas=replicas, racks=racks, it_megawatts=it_mw,
        facility_megawatts=facility_mw, capex_usd=gpus * hardware.capex_usd,
        energy_usd_per_year=facility_mw * 1000.0 * HOURS_PER_YEAR * energy_usd_per_kwh,
        rental_usd_per_year=rental,
        cost_per_million_tokens=rental / 365.0 / (demand_tokens_per_day / 1e6),
        utilization=utilization)


# ---------------------------------------------------------------------------------------------
# The supply ceiling: EUV tools -> gigawatts of accelerators per year
# ---------------------------------------------------------------------------------------------


def euv_ceiling_gw_per_year(tools: float = 700.0, tools_per_gw: float = 3.5) -> float:
    """GW of AI accelerators per year the EUV fleet can pattern if all of it went to AI."""
    if tools_per_gw <= 0:
        raise ValueError("tools_per_gw must be positive")
    return tools / tools_per_gw


def euv_sensitivity(tools: float = 700.0, low: float = 2.5, mid: float = 3.5,
                    high: float = 4.5) -> dict[str, float]:
    """The ceiling at low/mid/high tools-per-GW and the relative swing around the midpoint."""
    center = euv_ceiling_gw_per_year(tools, mid)
    at_low = euv_ceiling_gw_per_year(tools, low)       # fewer tools per GW -> higher ceiling
    at_high = euv_ceiling_gw_per_year(tools, high)
    return {"gw_per_year": center, "gw_at_low_tools_per_gw": at_low,
            "gw_at_high_tools_per_gw": at_high, "upside": at_low / center - 1.0,
            "downside": at_high / center - 1.0}
