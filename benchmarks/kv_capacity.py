"""int8 vs bfloat16 KV pages on the real SmolLM2 shapes: how many fit, and what decode
attention costs over them.

* ``capacity``: bytes per page (every layer, K and V), pages per GiB, and how many sequences of
  ``--context`` tokens a ``--budget`` of KV memory holds (the engine sizes its pool the same
  way: ``budget // bytes_per_block``, engine/core.py), for ``kv_cache_dtype`` auto (bf16) and
  int8. The page tensors are allocated and their size checked against the arithmetic.
* ``attention``: decode attention of ``--batch`` sequences at ``--context`` tokens over all of
  the model's layers (one cache per layer, so the pages stream from memory as in a real step):
  the bf16 native kernel (attention.c) vs the int8 one (attention_int8.c; on VNNI builds also
  its float32-score path as ``int8 native-f32``, the kernel before int8 dot products), and the torch
  fallbacks (gather + bmm; int8 also dequantizes), interleaved A/B over ``--repeats`` rounds,
  median ms per decode step, and the cache bytes each reads.

Usage (a quiet host; on a shared one prefer one thread and CPU time)::

    taskset -c 1 .venv/bin/python benchmarks/kv_capacity.py --threads 1 --clock cpu
    taskset -c 1 .venv/bin/python benchmarks/kv_capacity.py --threads 1 --clock cpu --batch 1 \
        --no-torch --prefill 512@0 64@1984 1@2047
    .venv/bin/python benchmarks/kv_capacity.py --batch 1 8 --repeats 7 --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tokenfactory.model import kernels  # noqa: E402
from tokenfactory.model.default import default_model_path  # noqa: E402
from tokenfactory.model.gguf import load_gguf_config  # noqa: E402
from tokenfactory.model.kernels import kv_int8  # noqa: E402
from tokenfactory.model.kv_pages import KVCacheSpec, kv_cache_spec, quantize_int8_rows  # noqa: E402
from tokenfactory.model.layers import AttentionMetadata, DecodeGroup, paged_attention  # noqa: E402

GiB = 1 << 30


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def capacity(cfg, spec: KVCacheSpec, budget: int, context: int, bs: int) -> dict:
    per_block = spec.bytes_per_block(cfg.num_layers, cfg.num_kv_heads, bs, cfg.head_dim)
    blocks = budget // per_block
    # the arithmetic against real tensors: one layer's K cache of 8 pages
    t = torch.empty(spec.cache_shape(cfg.num_kv_heads, 8, bs, cfg.head_dim), dtype=spec.dtype)
    assert 2 * cfg.num_layers * t.nbytes == 8 * per_block
    return dict(kv_cache_dtype=spec.name, bytes_per_page=per_block,
                bytes_per_token=per_block / bs, pages_per_gib=GiB // per_block,
                pages_in_budget=blocks, sequences=blocks // cdiv(context, bs))


def caches(cfg, spec: KVCacheSpec, batch: int, context: int, bs: int, seed: int):
    """One (K, V) per layer, ``batch`` sequences of ``context`` tokens each, random values (of
    K/V's magnitude) quantized as the engine would write them."""
    g = torch.Generator().manual_seed(seed)
    pages = batch * cdiv(context, bs)
    out = []
    for _ in range(cfg.num_layers):
        pair = []
        for _kv in range(2):
            x = torch.randn(cfg.num_kv_heads, pages, bs, cfg.head_dim, generator=g)
            pair.append(quantize_int8_rows(x) if spec.quantized else x.to(torch.bfloat16))
        out.append(tuple(pair))
    return out


def prefill(cfg, specs: dict, chunk: str, bs: int, scale: float, args, clock) -> dict:
    """One prompt chunk of N tokens at positions START .. START + N - 1 over
    ``--prefill-layers`` layers' caches: bf16 pages through the native prefill kernel
    (attention.c), int8 pages through the int8 kernel with one row per token (what
    ``layers.paged_attention`` runs for int8 prefill chunks), interleaved; median ms per chunk
    for all of the model's layers (scaled from the layers timed)."""
    n, start = (int(x) for x in chunk.split("@"))
    if kernels.library() is None or kv_int8.library() is None:
        return {}
    cfg_layers = cfg.num_layers
    cfg_small = type("C", (), dict(num_layers=args.prefill_layers, num_kv_heads=cfg.num_kv_heads,
                                   head_dim=cfg.head_dim))
    ctx = start + n
    table = torch.arange(cdiv(ctx, bs))
    q = torch.randn(n, cfg.num_heads, cfg.head_dim).to(torch.bfloat16)
    out = torch.empty_like(q)
    positions = torch.arange(start, ctx)
    arms = {}
    for name, spec in specs.items():
        layers = caches(cfg_small, spec, 1, ctx, bs, seed=n)
        if name == "bf16":
            arms["bf16 native"] = lambda layers=layers: [
                kernels.prefill_attention(q, k, v, table, start, None, scale, out)
                for k, v in layers]
        else:
            arms["int8 native"] = lambda layers=layers: [
                kv_int8.decode_attention(q, k, v, table[None].expand(n, -1), positions, None,
                                         scale, out) for k, v in layers]
    samples: dict[str, list[float]] = {a: [] for a in arms}
    with torch.inference_mode():
        for fn in arms.values():
            fn()
        for _ in range(args.repeats):
            for a, fn in arms.items():
                t0 = clock()
                fn()
                samples[a].append((clock() - t0) * 1e3 * cfg_layers / args.prefill_layers)
    row = {a: statistics.median(xs) for a, xs in samples.items()}
    print(f"prefill attention, {n} tokens after {start} cached, all {cfg_layers} layers "
          f"(from {args.prefill_layers}; median of {args.repeats}, {args.clock} ms):")
    for a, ms in row.items():
        print(f"  {a:15s} {ms:8.2f} ms")
    row["ratio"] = row["bf16 native"] / row["int8 native"]
    print(f"  int8 is {row['ratio']:.2f}x the speed of bf16")
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", default="1G", help="KV memory budget (bytes; K/M/G suffix)")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5, help="decode steps per timed sample")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch fallbacks")
    ap.add_argument("--prefill", nargs="*", default=[], metavar="N@START",
                    help="also time prefill chunks of N tokens after START cached ones (e.g. "
                         "512@0 64@1984): bf16 native prefill kernel vs the int8 kernel's rows")
    ap.add_argument("--prefill-layers", type=int, default=4, help="layers per prefill sample")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    b = args.budget.upper().removesuffix("B")
    budget = int(float(b[:-1]) * units[b[-1]]) if b[-1] in units else int(b)

    cfg = load_gguf_config(default_model_path())
    bs, ctx = args.block_size, args.context
    specs = {"bf16": kv_cache_spec("auto", torch.bfloat16), "int8": kv_cache_spec("int8", torch.bfloat16)}
    report: dict = {"model": "SmolLM2-135M", "layers": cfg.num_layers, "kv_heads": cfg.num_kv_heads,
                    "heads": cfg.num_heads, "head_dim": cfg.head_dim, "budget": budget,
                    "context": ctx, "block_size": bs, "threads": torch.get_num_threads(),
                    "clock": args.clock, "capacity": {}, "attention": {}}
    print(f"SmolLM2-135M KV: {cfg.num_layers} layers x {cfg.num_kv_heads} KV heads x "
          f"D {cfg.head_dim}, block {bs}; budget {budget / GiB:.2f} GiB, {ctx}-token sequences")
    for name, spec in specs.items():
        c = report["capacity"][name] = capacity(cfg, spec, budget, ctx, bs)
        print(f"  {name:5s} {c['bytes_per_page']:>8,} B/page  {c['bytes_per_token']:>9,.0f} B/token  "
              f"{c['pages_per_gib']:>6,} pages/GiB  {c['sequences']:>5,} sequences of {ctx}")
    ratio = report["capacity"]["int8"]["sequences"] / max(report["capacity"]["bf16"]["sequences"], 1)
    print(f"  int8 / bf16 sequences: {ratio:.2f}x")

    if kernels.library() is None or kv_int8.library() is None:
        print(f"native kernels unavailable ({kernels.unavailable_reason}): attention not timed")
    scale = cfg.head_dim ** -0.5
    for batch in args.batch:
        pages = cdiv(ctx, bs)
        tables = torch.arange(batch * pages).view(batch, pages)
        positions = torch.full((batch,), ctx - 1, dtype=torch.int64)
        q = torch.randn(batch, cfg.num_heads, cfg.head_dim).to(torch.bfloat16)
        out = torch.empty_like(q)
        arms = {}
        for name, spec in specs.items():
            layers = caches(cfg, spec, batch, ctx, bs, seed=batch)
            if kernels.library() is not None and kv_int8.library() is not None:
                fn = kernels.decode_attention if name == "bf16" else kv_int8.decode_attention
                arms[f"{name} native"] = (lambda fn=fn, layers=layers: [
                    fn(q, k, v, tables, positions, None, scale, out) for k, v in layers])
                if name == "int8" and kv_int8.int8_dot():   # the float32-score path, for A/B
                    arms["int8 native-f32"] = (lambda layers=layers: [
                        kv_int8.decode_attention(q, k, v, tables, positions, None, scale, out,
                                                 int8_dot=False) for k, v in layers])
            if not args.no_torch:
                def fallback(layers=layers):
                    for k, v in layers:   # the torch path of paged_attention, no writes
                        meta = AttentionMetadata(block_size=bs, slot_mapping=torch.empty(0, dtype=torch.int64),
                                                 num_decodes=batch, native_decode=False,
                                                 decode_groups=[DecodeGroup(0, batch, tables, positions)])
                        kw = torch.empty(0, k.shape[0], cfg.head_dim, dtype=torch.bfloat16)
                        paged_attention(q, kw, kw, k, v, meta, None, scale)
                arms[f"{name} torch"] = fallback
            bytes_read = 2 * cfg.num_layers * batch * ctx * cfg.num_kv_heads * spec.row_width(cfg.head_dim) \
                * torch.empty((), dtype=spec.dtype).element_size()
            report["attention"].setdefault(str(batch), {})[f"{name}_bytes_per_step"] = bytes_read
        samples: dict[str, list[float]] = {a: [] for a in arms}
        with torch.inference_mode():
            for fn in arms.values():   # warm-up (first touch, library load)
                fn()
            for _ in range(args.repeats):
                for a, fn in arms.items():
                    t0 = clock()
                    for _ in range(args.iters):
                        fn()
                    samples[a].append((clock() - t0) / args.iters * 1e3)
        row = report["attention"][str(batch)]
        print(f"decode attention, batch {batch} x {ctx} tokens, all {cfg.num_layers} layers "
              f"(median of {args.repeats}, {args.clock} ms per step):")
        for a, xs in samples.items():
            ms = statistics.median(xs)
            gbs = row[f"{a.split()[0]}_bytes_per_step"] / ms / 1e6
            row[a] = ms
            print(f"  {a:15s} {ms:8.2f} ms  ({gbs:5.1f} GB/s of cache read)")
        for kind in ("native", "torch"):
            if f"int8 {kind}" in row and f"bf16 {kind}" in row:
                row[f"ratio_{kind}"] = row[f"bf16 {kind}"] / row[f"int8 {kind}"]
                print(f"  {kind}: int8 is {row[f'ratio_{kind}']:.2f}x the speed of bf16")
    for chunk in args.prefill:
        report.setdefault("prefill", {})[chunk] = prefill(cfg, specs, chunk, bs, scale, args, clock)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
