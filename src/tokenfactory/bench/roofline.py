"""How close a run came to this machine's limits.

The host is measured by `tokenfactory.economics.host.measure_host()` (memory bandwidth, fp32/bf16
matmul throughput). From the client's view of a run we estimate:

* decode: one decode step reads all weights once plus the KV cache of every running sequence.
  Step time ~ median TPOT; sequences per step ~ output tok/s x step time (Little's law); so
  achieved bytes/s = weight_bytes / step_time + output_tok/s x mean_context x kv_bytes_per_token.
  decode efficiency = achieved bytes/s / measured bandwidth.
* prefill: FLOPs of the uncached prompt tokens (2 x matmul params per token + attention over the
  cached and new context) divided by the time to first token, summed over requests with at least
  `min_uncached` new tokens. TTFT includes queueing, so this is a lower bound.
  prefill efficiency = achieved FLOP/s / measured matmul FLOP/s at the model's dtype.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from tokenfactory.bench.client import RequestRecord


def host_roofline() -> dict[str, Any]:
    """Measured host limits as a flat dict, or {"error": why} when they cannot be measured."""
    try:
        from tokenfactory.economics.host import measure_host
    except ImportError as exc:
        return {"error": f"tokenfactory.economics.host.measure_host is not available ({exc})"}
    try:
        result = measure_host()
    except Exception as exc:  # noqa: BLE001 - the benchmark goes on without a roofline
        return {"error": f"measure_host() failed: {type(exc).__name__}: {exc}"}
    if dataclasses.is_dataclass(result):
        raw = dataclasses.asdict(result)
    elif isinstance(result, dict):
        raw = dict(result)
    else:
        raw = {k: v for k, v in vars(result).items() if not k.startswith("_")}
    return {"raw": raw, **_normalize(raw)}


def _normalize(raw: dict) -> dict:
    """Find bandwidth (bytes/s) and fp32/bf16 FLOP/s in whatever units measure_host reports."""
    flat: dict[str, float] = {}

    def walk(d: dict, prefix: str = "") -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, prefix + k + ".")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                flat[(prefix + k).lower()] = float(v)

    walk(raw)

    def find(words: Sequence[str], exclude: Sequence[str] = ()) -> tuple[str, float] | None:
        for k, v in flat.items():
            if all(w in k for w in words) and not any(x in k for x in exclude):
                return k, v
        return None

    def scaled(key: str, value: float, base: str) -> float:
        for unit, mult in (("tflop", 1e12), ("gflop", 1e9), ("tb", 1e12), ("gb", 1e9), ("mb", 1e6)):
            if unit in key:
                return value * mult
        return value

    out: dict[str, float] = {}
    bw = find(["bandwidth"]) or find(["bw"])
    if bw:
        out["memory_bandwidth_bytes_s"] = scaled(*bw, "b")
    for dt in ("fp32", "bf16"):
        hit = find([dt, "flop"]) or find([dt, "matmul"]) or find([dt])
        if hit:
            out[f"{dt}_flops"] = scaled(*hit, "flop")
    return out


def efficiency(records: Sequence[RequestRecord], metrics: dict, shape: dict, host: dict,
               dtype: str | None = None, min_uncached: int = 64) -> dict[str, Any]:
    """Decode and prefill efficiency estimates for one run (see the module docstring)."""
    dtype = dtype or shape["dtype"]
    bpp = {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, shape["bytes_per_param"])
    kv_bytes = shape["kv_bytes_per_token"] // shape["bytes_per_param"] * bpp
    ok = [r for r in records if r.ok]
    out: dict[str, Any] = {"dtype": dtype, "weight_bytes": shape["params"] * bpp}
    step = metrics.get("tpot_p50_s")
    if step and ok:
        mean_ctx = sum(r.prompt_tokens + r.output_tokens / 2 for r in ok) / len(ok)
        achieved = shape["params"] * bpp / step + metrics["output_throughput_tps"] * mean_ctx * kv_bytes
        out["decode_bytes_per_s"] = achieved
        out["decode_step_s"] = step
        out["decode_batch_estimate"] = metrics["output_throughput_tps"] * step
    matmul_params = shape["params_layers"]     # the LM head runs for the last prompt token only
    flops = secs = 0.0
    L, d = shape["num_layers"], shape["attn_dim"]
    for r in ok:
        new = r.prompt_tokens - r.cached_tokens
        if new < min_uncached or r.t_first is None:
            continue
        flops += 2 * matmul_params * new + 4 * L * d * new * (r.cached_tokens + new / 2)
        secs += r.t_first - r.t_send
    if secs > 0:
        out["prefill_flops_per_s"] = flops / secs
    bw = host.get("memory_bandwidth_bytes_s")
    if bw and "decode_bytes_per_s" in out:
        out["decode_efficiency"] = out["decode_bytes_per_s"] / bw
    peak = host.get("bf16_flops" if bpp == 2 else "fp32_flops")
    if peak and "prefill_flops_per_s" in out:
        out["prefill_efficiency"] = out["prefill_flops_per_s"] / peak
    return out
