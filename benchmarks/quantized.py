"""QuantLinear (GGUF blocks as stored) vs bf16 on the real SmolLM2 Q4_1 file, in process.

Three measurements, each interleaved A/B over ``--repeats`` rounds (median reported):

* ``linears``: every linear of the model once at batch 1 (the decode step's weight stream),
  as stored (native quant kernel) vs bf16 (CpuLinear's native bf16 kernel): ms, weight bytes
  read and the bandwidth that is, against a measured read bandwidth of this host;
* ``decode``: batch-1 decode steps through the model's torch forward (same attention, norms
  and Python for both), tok/s; ``native_decode``: the same through the engine's one-call
  native decode step (native_step.py), where it takes the model;
* ``prefill``: one 512-token prefill chunk, tok/s; QuantLinear runs it through dequantize +
  oneDNN above ``--native-max-rows`` rows (``--force-native`` measures the native kernel).

Usage: ``.venv/bin/python benchmarks/quantized.py --repeats 3 [--json out.json]``. Keep it
short on a shared host and say so when quoting numbers (this 2-core machine is shared); there,
``OMP_NUM_THREADS=1 ... --clock cpu`` counts CPU seconds of one thread instead of wall time.

Measured 2026-11-29 15:15 UTC, SmolLM2-135M Q4_1, AMD EPYC Zen 4 (2 cores, AVX-512 BF16),
host shared by 8 sessions (load average 5-12): ``OMP_NUM_THREADS=1 .venv/bin/python
benchmarks/quantized.py --repeats 3 --decode-steps 24 --clock cpu``, medians, one thread:

    linear weights read per token   Q4_1+Q8_0 96.4 MB   bf16 269.0 MB
    all linears once, batch 1       13.8 ms (7.0 GB/s)  11.9 ms (22.6 GB/s)
    decode b1, native decode step   78.0 tok/s          91.7 tok/s
    decode b1, torch forward        48.3 tok/s          53.2 tok/s
    prefill 512                     689 tok/s           725 tok/s

One thread reads bf16 at its bandwidth while the quantized kernel is bound by instructions
(~10 cycles a Q4_1 block), so per core it is ~15% slower; with both cores the bf16 path stays
at the memory's bandwidth and the quantized one should scale with cores -- not measurable
here while the host was loaded (2-thread wall-clock rounds varied 10x).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from tokenfactory.model import hugepages, native_step
from tokenfactory.model.default import default_model_path
from tokenfactory.model.layers import (AttentionMetadata, CpuLinear, DecodeGroup, PrefillSeq,
                                       use_cpu_linears)
from tokenfactory.model.loader import load_model
from tokenfactory.model.quant_linear import QuantLinear

BS = 16
CLOCK = time.perf_counter   # --clock cpu: process CPU time (for a shared host, with 1 thread)


def bind_cache(model, pages: int) -> None:
    cfg = model.config
    for layer in model.layers:
        shape = (cfg.num_kv_heads, pages, BS, cfg.head_dim)
        layer.self_attn.k_cache = torch.zeros(shape, dtype=torch.bfloat16)
        layer.self_attn.v_cache = torch.zeros(shape, dtype=torch.bfloat16)


def linears(model) -> list[torch.nn.Module]:
    mods = []
    for layer in model.layers:
        mods += [layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                 layer.mlp.down_proj]
    return mods + [model.lm_head]


def weight_bytes(mods) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in mods)


def time_linears(model, iters: int) -> float:
    """Seconds for one pass over every linear at batch 1."""
    mods = linears(model)
    xs = {m.in_features: torch.randn(1, m.in_features).to(torch.bfloat16) for m in mods}
    with torch.no_grad():
        for m in mods:
            m(xs[m.in_features])
        t = CLOCK()
        for _ in range(iters):
            for m in mods:
                m(xs[m.in_features])
    return (CLOCK() - t) / iters


def time_decode(model, steps: int, context: int = 64) -> float:
    """tok/s of batch-1 decode steps at positions context .. context + steps."""
    pages = (context + steps) // BS + 2
    bind_cache(model, pages)
    table = torch.arange(pages)[None]
    with torch.no_grad():
        t = None
        for i in range(steps + 3):
            if i == 3:
                t = CLOCK()
            pos = torch.tensor([context + i])
            meta = AttentionMetadata(block_size=BS, slot_mapping=pos, num_decodes=1,
                                     decode_groups=[DecodeGroup(0, 1, table, pos)])
            h = model(torch.tensor([i % 1000]), pos, meta)
            model.compute_logits(h)
    return steps / (CLOCK() - t)


def time_native_decode(model, steps: int, context: int = 64) -> float | None:
    """tok/s of batch-1 decode steps through the engine's one-call native decode step
    (native_step.py), or None where that step does not take this model."""
    pages = (context + steps) // BS + 2
    bind_cache(model, pages)
    try:
        step = native_step.NativeDecodeStep(model, pages, BS)
    except (ValueError, AttributeError, TypeError) as exc:
        print(f"native decode step unavailable: {exc}")
        return None
    table = [list(range(pages))]
    t = None
    for i in range(steps + 3):
        if i == 3:
            t = CLOCK()
        step([i % 1000], [context + i], [context + i], table)
    return steps / (CLOCK() - t)


def time_prefill(model, n: int) -> float:
    pages = n // BS + 1
    bind_cache(model, pages)
    ids = torch.randint(0, 40000, (n,), generator=torch.Generator().manual_seed(0))
    meta = AttentionMetadata(block_size=BS, slot_mapping=torch.arange(n),
                             prefills=[PrefillSeq(0, n, 0, torch.arange(pages))])
    with torch.no_grad():
        t = CLOCK()
        h = model(ids, torch.arange(n), meta)
        model.compute_logits(h[-1:])
    return n / (CLOCK() - t)


def read_bandwidth() -> float:
    """GB/s of a plain read (sum) of 256 MB: the host's streaming bandwidth, roughly."""
    buf = torch.ones(64 << 20, dtype=torch.float32)
    buf.sum()
    t = CLOCK()
    for _ in range(5):
        buf.sum()
    return 5 * buf.numel() * 4 / (CLOCK() - t) / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--force-native", action="store_true",
                    help="QuantLinear's native kernel for every row count")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: process CPU seconds instead of wall time; with "
                         "OMP_NUM_THREADS=1 a proxy for work done on a host others share")
    ap.add_argument("--json")
    args = ap.parse_args()
    global CLOCK
    if args.clock == "cpu":
        CLOCK = time.process_time
    path = default_model_path()
    quant = load_model(path, quantization="gguf")
    bf16 = load_model(path, quantization="none")
    use_cpu_linears(bf16)   # the native bf16 small-batch kernel, oneDNN above (as served)
    for model in (quant, bf16):
        hugepages.relocate(model)   # as the executor does (QuantLinear blocks leave the map)
    assert all(isinstance(m, QuantLinear) for m in linears(quant))
    assert all(isinstance(m, CpuLinear) for m in linears(bf16))
    if args.force_native:
        for m in linears(quant):
            m.native_max_rows = 1 << 30
    models = {"quant": quant, "bf16": bf16}
    res: dict[str, dict[str, list[float]]] = {k: {"linears_ms": [], "decode_tok_s": [],
                                                  "native_decode_tok_s": [], "prefill_tok_s": []} for k in models}
    bandwidth = []
    for _ in range(args.repeats):
        bandwidth.append(read_bandwidth())
        for name, model in models.items():   # interleaved A/B
            res[name]["linears_ms"].append(time_linears(model, 10) * 1e3)
            res[name]["decode_tok_s"].append(time_decode(model, args.decode_steps))
            res[name]["native_decode_tok_s"].append(time_native_decode(model, args.decode_steps))
            res[name]["prefill_tok_s"].append(time_prefill(model, args.prefill))
    bw = statistics.median(bandwidth)
    out = {"host_read_GB_s": bw, "threads": torch.get_num_threads(), "clock": args.clock,
           "models": {}}
    for name, model in models.items():
        nbytes = weight_bytes(linears(model))
        ms = statistics.median(res[name]["linears_ms"])
        out["models"][name] = {
            "linear_weight_MB_per_token": nbytes / 1e6, "linears_ms": ms,
            "linears_GB_s": nbytes / ms / 1e6, "fraction_of_read_bw": nbytes / ms / 1e6 / bw,
            "decode_tok_s": statistics.median(res[name]["decode_tok_s"]),
            "native_decode_tok_s": (statistics.median(res[name]["native_decode_tok_s"])
                                    if None not in res[name]["native_decode_tok_s"] else None),
            "prefill_tok_s": statistics.median(res[name]["prefill_tok_s"]),
            "raw": res[name]}
    out["load_average"] = os.getloadavg()
    print(json.dumps({k: v for k, v in out.items()}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
