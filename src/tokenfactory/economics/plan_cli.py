"""``tokenfactory plan``: what a model costs to serve on given hardware, and how big a fleet.

    tokenfactory plan --model llama-3-70b --hardware h100 --tp 2 --context 4096 --batch 64
    tokenfactory plan --model deepseek-v3 --hardware b200 --demand 1e12 --workload agentic
    tokenfactory plan --model path/to/config.json --hardware host --json
    tokenfactory plan --model llama-3-70b --plot cost.png

``main(argv)`` returns a process exit code; user errors print one line on stderr and return 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from . import analytics as an
from .catalog import CatalogError, HardwareSpec, ModelSpec, hardware_names, load_hardware, \
    load_model, model_names
from .fleet import load_workload, size_fleet

PROG = "tokenfactory plan"
DEFAULT_PLOT_HARDWARE = "a100,h100,h200,b200,gb200,mi300x,mi355x"


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):          # argparse would sys.exit(2) from library code
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Serving cost and fleet size from the roofline.")
    p.add_argument("--model", default="llama-3-70b",
                   help=f"catalog name ({', '.join(model_names())}) or a config.json path")
    p.add_argument("--hardware", default="h100",
                   help=f"one of: {', '.join(hardware_names())}")
    p.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel size (default: smallest power of two that fits)")
    p.add_argument("--precision", default="bf16", help="weight precision (bf16, fp8, fp4, ...)")
    p.add_argument("--kv-dtype", default=None, help="KV cache precision (default: --precision)")
    p.add_argument("--context", type=int, default=4096, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=None,
                   help="concurrent sequences (default: the largest that fits)")
    p.add_argument("--cost-per-hour", type=float, default=None,
                   help="$ per accelerator-hour (default: the catalog's)")
    p.add_argument("--memory-fraction", type=float, default=1.0,
                   help="share of accelerator memory usable for weights + KV (default 1.0)")
    p.add_argument("--demand", type=float, default=None,
                   help="tokens per day (input + output) to size a fleet for")
    p.add_argument("--workload", default="chat", help="chat, agentic, long-context, reasoning")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="draw $/M output tokens against batch size for several hardware")
    p.add_argument("--plot-hardware", default=DEFAULT_PLOT_HARDWARE,
                   help="comma-separated hardware for --plot")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def _choose_tp(model: ModelSpec, hw: HardwareSpec, args) -> int:
    kv = args.kv_dtype
    if args.tp is not None:
        if args.tp < 1:
            raise UsageError("--tp must be >= 1")
        if an.max_batch(model, hw, args.context, args.tp, args.precision, kv,
                        args.memory_fraction) < 1:
            need = an.min_tp_to_fit(model, hw, args.context, args.precision, kv,
                                    args.memory_fraction)
            hint = f"; try --tp {need}" if need else ""
            raise UsageError(
                f"{model.name} does not fit on {args.tp} x {hw.key}: weights "
                f"{an.weight_bytes(model, args.precision) / 1e9:.1f} GB + one "
                f"{args.context}-token sequence exceed "
                f"{args.tp * hw.memory_bytes * args.memory_fraction / 1e9:.1f} GB{hint}")
        return args.tp
    tp = an.min_tp_to_fit(model, hw, args.context, args.precision, kv, args.memory_fraction)
    if tp is None:
        raise UsageError(f"{model.name} at a {args.context}-token context does not fit on "
                         f"up to 1024 x {hw.key}")
    return tp


def plan(args) -> dict:
    if args.context < 1:
        raise UsageError("--context must be >= 1")
    if args.batch is not None and args.batch < 1:
        raise UsageError("--batch must be >= 1")
    if args.cost_per_hour is not None and args.cost_per_hour < 0:
        raise UsageError("--cost-per-hour must be >= 0")
    if not 0 < args.memory_fraction <= 1:
        raise UsageError("--memory-fraction must be in (0, 1]")
    model = load_model(args.model)
    hw = load_hardware(args.hardware)
    kv_dtype = args.kv_dtype or args.precision
    an.kv_bytes_per_token(model, kv_dtype)            # validates the dtype names early
    tp = _choose_tp(model, hw, args)
    fits = an.max_batch(model, hw, args.context, tp, args.precision, kv_dtype,
                        args.memory_fraction)
    batch = args.batch or fits
    warnings = []
    if model.max_context and args.context > model.max_context:
        warnings.append(f"context {args.context} exceeds {model.name}'s "
                        f"max_position_embeddings {model.max_context}")
    if batch > fits:
        warnings.append(f"batch {batch} exceeds the {fits} sequences whose KV fits at "
                        f"context {args.context}")
    rate = hw.cost_per_hour if args.cost_per_hour is None else args.cost_per_hour
    step = an.decode_floor(model, hw, batch, args.context, tp, args.precision, kv_dtype)
    one = an.decode_floor(model, hw, 1, args.context, tp, args.precision, kv_dtype)
    thr = an.decode_throughput(model, hw, batch, args.context, tp, args.precision, kv_dtype)
    params = an.param_count(model)
    prefill_s = an.prefill_flops(model, args.context) / (hw.peak_flops(args.precision) * tp)
    result = {
        "model": model.name, "model_source": model.source,
        "hardware": hw.key, "hardware_name": hw.name, "hardware_source": hw.source,
        "tp": tp, "precision": args.precision, "kv_dtype": kv_dtype,
        "context": args.context, "batch": batch,
        "params_total": params.total, "params_active": params.active,
        "weight_bytes": an.weight_bytes(model, args.precision),
        "kv_bytes_per_token": an.kv_bytes_per_token(model, kv_dtype),
        "kv_bytes_per_sequence": an.kv_bytes_for_context(model, args.context, kv_dtype),
        "decode_floor_ms": step.ms,
        "decode_floor_batch1_ms": one.ms,
        "memory_ms": step.memory_seconds * 1e3, "compute_ms": step.compute_seconds * 1e3,
        "bound": step.bound,
        "arithmetic_intensity": step.arithmetic_intensity,
        "ridge_point": an.ridge_point(hw, args.precision),
        "max_batch": fits,
        "prefill_ms_at_peak": prefill_s * 1e3,
        "cost_per_hour": rate,
        "cost_per_million_output_tokens": an.cost_per_million_output_tokens(
            model, hw, batch, args.context, tp, rate, args.precision, kv_dtype),
        "tokens_per_s": thr.tokens_per_s,
        "tokens_per_s_per_gpu": thr.tokens_per_s_per_gpu,
        "tokens_per_s_per_rack": thr.tokens_per_s_per_rack,
        "tokens_per_s_per_mw": thr.tokens_per_s_per_mw,
        "warnings": warnings,
    }
    if args.demand is not None:
        workload = load_workload(args.workload)
        try:
            fleet = size_fleet(model, hw, args.demand, workload, tp, args.precision, kv_dtype,
                               args.batch, rate)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        result["fleet"] = fleet.to_dict()
    return result


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


def render_table(r: dict) -> str:
    rows = [
        ("model", f"{r['model']}  ({r['params_total'] / 1e9:,.1f}B total, "
                  f"{r['params_active'] / 1e9:,.1f}B active)"),
        ("hardware", f"{r['tp']} x {r['hardware_name']}"),
        ("precision / KV dtype", f"{r['precision']} / {r['kv_dtype']}"),
        ("weights", _fmt_bytes(r["weight_bytes"])),
        ("KV per token", f"{r['kv_bytes_per_token']:,.0f} B"),
        (f"KV per {r['context']}-token sequence", _fmt_bytes(r["kv_bytes_per_sequence"])),
        ("max batch at this context", f"{r['max_batch']:,}"),
        ("batch", f"{r['batch']:,}"),
        ("decode step (batch 1)", f"{r['decode_floor_batch1_ms']:.2f} ms"),
        ("decode step (batch)", f"{r['decode_floor_ms']:.2f} ms, {r['bound']}-bound "
                                f"(memory {r['memory_ms']:.2f} ms, compute "
                                f"{r['compute_ms']:.2f} ms)"),
        ("ridge point", f"{r['ridge_point']:.1f} FLOP/byte (step at "
                        f"{r['arithmetic_intensity']:.1f})"),
        ("prefill of the context at peak", f"{r['prefill_ms_at_peak']:.1f} ms"),
        ("throughput", f"{r['tokens_per_s']:,.0f} tok/s ({r['tokens_per_s_per_gpu']:,.0f} per "
                       f"GPU, {r['tokens_per_s_per_rack']:,.0f} per rack, "
                       f"{r['tokens_per_s_per_mw']:,.0f} per MW)"),
        ("$ per M output tokens", f"${r['cost_per_million_output_tokens']:,.4f} at "
                                  f"${r['cost_per_hour']:.2f}/h per accelerator"),
    ]
    fleet = r.get("fleet")
    if fleet:
        rows += [
            ("fleet workload", f"{fleet['workload']}: {fleet['demand_tokens_per_day']:.3g} "
                               f"tokens/day, {fleet['requests_per_day']:.3g} requests/day"),
            ("fleet size", f"{fleet['gpus']:,} accelerators in {fleet['racks']:,} racks, "
                           f"{fleet['facility_megawatts']:,.2f} MW facility"),
            ("capex", f"${fleet['capex_usd']:,.0f}"),
            ("opex per year", f"${fleet['rental_usd_per_year']:,.0f} rental-equivalent, "
                              f"${fleet['energy_usd_per_year']:,.0f} energy"),
            ("blended $ per M tokens", f"${fleet['cost_per_million_tokens']:,.4f}"),
        ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def plot_cost_vs_batch(path: str, model: ModelSpec, hardware: Sequence[str], context: int,
                       precision: str, kv_dtype: Optional[str], tp: Optional[int],
                       cost_per_hour: Optional[float]) -> list[str]:
    """$ per M output tokens against batch size, one line per hardware (up to its max
    batch). Returns the hardware actually drawn."""
    import matplotlib                       # lazy: plotting is the only user of matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = []
    for name in hardware:
        hw = load_hardware(name)
        n = tp or an.min_tp_to_fit(model, hw, context, precision, kv_dtype)
        if not n:
            continue
        top = an.max_batch(model, hw, context, n, precision, kv_dtype)
        if top < 1:
            continue
        batches = sorted({b for b in (2 ** i for i in range(20)) if b <= top} | {top})
        costs = [an.cost_per_million_output_tokens(model, hw, b, context, n, cost_per_hour,
                                                   precision, kv_dtype) for b in batches]
        ax.plot(batches, costs, marker="o", markersize=3, label=f"{n} x {hw.key}")
        drawn.append(hw.key)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (concurrent sequences)")
    ax.set_ylabel("$ per million output tokens")
    ax.set_title(f"{model.name}, {precision}, context {context}: decode cost on the roofline")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        result = plan(args)
        if args.plot:
            names = [h.strip() for h in args.plot_hardware.split(",") if h.strip()]
            result["plot"] = args.plot
            result["plot_hardware"] = plot_cost_vs_batch(
                args.plot, load_model(args.model), names, args.context, args.precision,
                args.kv_dtype, args.tp, args.cost_per_hour)
    except SystemExit as exc:                # --help
        return int(exc.code or 0)
    except (UsageError, CatalogError, ValueError, OSError, ImportError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    for warning in result["warnings"]:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render_table(result))
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
