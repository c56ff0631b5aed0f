"""Token warehouse (issue 18) on the real model: restore speed vs prefill, and an agentic hit rate.

1. **Restore vs recompute, 4K-token prefix** (SmolLM2-135M-Instruct, bf16 KV, 16-token pages):
   interleaved rounds of (a) a cold request (empty warehouse, empty RAM cache; ``max_tokens=1``,
   so its time is the prefill), (b) the same request after the RAM cache is reset (its pages come
   from the warehouse through the OS page cache), (c) the pure restore: ``load`` of every page
   into the pool, timed alone, with the files in the page cache and again after
   ``posix_fadvise(DONTNEED)`` on each file (the bytes come from the disk).
2. **Agentic sessions with a RAM pool too small for them**: ``bench.workloads.agentic`` (one
   shared system prompt, per-session task, scripted assistant turns and tool results) run one
   turn at a time round robin across sessions, on an engine whose pool holds ~1.25 times the
   longest session's context, with and without the warehouse: hit rate (cached / prompt tokens, the usage
   ``cached_tokens``) and engine seconds per session (task).

3. **Long agentic sessions, bookkeeping only** (``--bookkeeping``): 8 sessions x 20 turns
   behind a 4,096-token prefix through the real scheduler, KV manager and warehouse files, a
   scripted executor instead of the model (hit rates, no seconds), RAM pool 25% of the final
   contexts.

    .venv/bin/python benchmarks/warehouse.py [--rounds 3] [--sessions 4] [--turns 4]
    .venv/bin/python benchmarks/warehouse.py --bookkeeping

Every agentic part also prints the hit rate of an unbounded cache (every full block some
earlier request computed counts as a hit): no tier can beat it.

Everything runs in one process on the current host; it is shared with other work, so compare
the columns of one run, not runs of different days. The warehouse lives in a temporary
directory (deleted at the end).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

import torch

from tokenfactory.bench.workloads import agentic
from tokenfactory.engine.block_pool import hash_block
from tokenfactory.engine.llm import build_engine_core
from tokenfactory.engine.sampling_params import SamplingParams
from tokenfactory.engine.warehouse import open_warehouse
from tokenfactory.model.default import default_model_path

BS = 16


def run(core, rid: str, prompt: list[int], max_tokens: int = 1):
    core.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                 ignore_eos=True))
    out = None
    while core.has_unfinished_requests():
        for o in core.step():
            if o.finished:
                out = o
    return out


def drop_page_cache(directory: str) -> None:
    """Ask the kernel to forget the cached bytes of the warehouse's files (only those)."""
    for root, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def restore_vs_prefill(model: str, rounds: int, prefix_tokens: int) -> None:
    core = build_engine_core(model, kernels=None, block_size=BS,
                             num_kv_blocks=prefix_tokens // BS + 16, max_model_len=8192)
    rng = random.Random(0)
    prompt = [rng.randrange(100, 49000) for _ in range(prefix_tokens + 1)]
    n_blocks = prefix_tokens // BS
    page_bytes = core.executor.kv_cache_bytes_per_block(BS)
    print(f"\n## restore vs recompute: {prefix_tokens}-token prefix, {n_blocks} pages of "
          f"{page_bytes / 2**10:.0f} KiB ({n_blocks * page_bytes / 2**20:.0f} MiB)")
    toks = [prompt[i * BS:(i + 1) * BS] for i in range(n_blocks)]
    hashes, parent = [], None
    for block in toks:
        parent = hash_block(parent, block)
        hashes.append(parent)
    run(core, "warmup", prompt[:256])
    cold, warm, load_hot, load_disk = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="tf-warehouse-") as d:
        wh = open_warehouse(core.executor, d, max_bytes=8 << 30)
        core.kv.attach_connector(wh)
        for r in range(rounds):
            for root, _, files in os.walk(d):          # (a) cold: nothing anywhere
                for name in files:
                    os.unlink(os.path.join(root, name))
            core.reset_prefix_cache()
            t = time.perf_counter()
            run(core, f"cold-{r}", prompt)
            cold.append(time.perf_counter() - t)
            wh.flush()
            core.reset_prefix_cache()                  # (b) the same request from the warehouse
            t = time.perf_counter()
            out = run(core, f"warm-{r}", prompt)
            warm.append(time.perf_counter() - t)
            assert out.num_cached_tokens == prefix_tokens, out.num_cached_tokens
            core.reset_prefix_cache()                  # (c) pure restore, timed alone
            pool = core.kv.pool
            for label, sink in (("hot", load_hot), ("disk", load_disk)):
                if label == "disk":
                    drop_page_cache(d)
                blocks = pool.allocate(n_blocks)
                t = time.perf_counter()
                got = wh.load(hashes, blocks, toks)
                sink.append(time.perf_counter() - t)
                pool.free_blocks(blocks)
                assert got == n_blocks, got
        wh.close()
    med = statistics.median
    print(f"rounds: {rounds} (interleaved); medians, all runs in brackets")
    print(f"cold request (prefill {prefix_tokens} tokens + 1): {med(cold):.3f} s "
          f"-> {prefix_tokens / med(cold):,.0f} tok/s  {[round(x, 3) for x in cold]}")
    print(f"warm request (pages from the warehouse):        {med(warm):.3f} s "
          f"-> {med(cold) / med(warm):.1f}x faster  {[round(x, 3) for x in warm]}")
    for label, xs in (("page cache", load_hot), ("disk (fadvise DONTNEED)", load_disk)):
        print(f"restore alone, {label}: {med(xs):.3f} s -> {prefix_tokens / med(xs):,.0f} tok/s, "
              f"{n_blocks * page_bytes / med(xs) / 2**30:.2f} GiB/s, "
              f"{med(cold) / med(xs):.1f}x the prefill  {[round(x, 3) for x in xs]}")


def agentic_prompts(tok, sessions: int, turns: int, prefix_tokens: int, tool_min: int,
                    tool_max: int) -> tuple[list[list[list[int]]], float]:
    """Token ids per [session][turn] of ``bench.workloads.agentic`` (scripted assistant turns,
    so every run sends the same prompts), and the hit rate of an unbounded cache."""
    wl = agentic(seed=0, sessions=sessions, turns=turns, prefix_tokens=prefix_tokens,
                 tool_min=tool_min, tool_max=tool_max, output_tokens=16)
    system = tok.encode(wl.sessions[0].system, add_special_tokens=False)
    prompts: list[list[list[int]]] = []
    for sess in wl.sessions:
        ctx, per_turn = list(system), []
        for t in sess.turns:
            if t.assistant:
                ctx += tok.encode(t.assistant, add_special_tokens=False)
            ctx += tok.encode(t.user, add_special_tokens=False)
            per_turn.append(list(ctx))
        prompts.append(per_turn)
    # The best any cache could do: every full block some earlier request computed is a hit.
    seen: set[bytes] = set()
    ideal = total = 0
    for turn in range(turns):
        for s in range(sessions):
            ids, parent, hashes = prompts[s][turn], None, []
            for i in range(len(ids) // BS):
                parent = hash_block(parent, ids[i * BS:(i + 1) * BS])
                hashes.append(parent)
            lead = 0
            while lead < (len(ids) - 1) // BS and hashes[lead] in seen:
                lead += 1
            ideal += lead * BS
            total += len(ids)
            seen.update(hashes)
    return prompts, ideal / total


def describe(prompts, blocks: int, ideal: float) -> str:
    longest = max(len(p[-1]) for p in prompts)
    n = sum(len(p) for p in prompts)
    return (f"{len(prompts)} sessions x {len(prompts[0])} turns ({n} requests), longest context "
            f"{longest} tokens; RAM pool {blocks} pages ({blocks * BS} tokens); an unbounded "
            f"cache would hit {ideal:.1%}")


def play(core, prompts, max_tokens: int) -> tuple[int, int, float]:
    """One turn per session, round robin (agents wait for their tool results). Returns
    (prompt tokens, cached tokens, seconds)."""
    prompt_tokens = cached = 0
    t = time.perf_counter()
    for turn in range(len(prompts[0])):
        for s, per_turn in enumerate(prompts):
            out = run(core, f"s{s}-t{turn}", per_turn[turn], max_tokens=max_tokens)
            prompt_tokens += len(per_turn[turn])
            cached += out.num_cached_tokens
    return prompt_tokens, cached, time.perf_counter() - t


def agentic_hit_rate(model: str, sessions: int, turns: int, pool_blocks: int | None) -> None:
    """The real model: hit rate and engine seconds per session, with and without the warehouse."""
    core = build_engine_core(model, kernels=None, block_size=BS, num_kv_blocks=64,
                             max_model_len=8192)
    prompts, ideal = agentic_prompts(core.tokenizer, sessions, turns, 512, 100, 300)
    del core
    blocks = pool_blocks or (max(len(p[-1]) for p in prompts) * 5 // 4) // BS
    print(f"\n## agentic on the real model: {describe(prompts, blocks, ideal)}")
    for label in ("RAM only", "RAM + warehouse"):
        core = build_engine_core(model, kernels=None, block_size=BS, num_kv_blocks=blocks,
                                 max_model_len=8192)
        with tempfile.TemporaryDirectory(prefix="tf-warehouse-") as d:
            wh = None
            if label != "RAM only":
                wh = open_warehouse(core.executor, d, max_bytes=8 << 30)
                core.kv.attach_connector(wh)
            prompt_tokens, cached, seconds = play(core, prompts, 16)
            stats = core.kv.stats()
            if wh is not None:
                wh.close()
        print(f"{label:16s} hit rate {cached / prompt_tokens:6.1%} ({cached}/{prompt_tokens} "
              f"tokens; warehouse {stats.connector_hits}), {seconds:6.1f} s total, "
              f"{seconds / sessions:5.2f} machine-s per task")
        del core


class _TinyPages:
    """A KVPageIO with 32-byte pages: the bookkeeping run stores real page files without a
    model behind them."""

    def read_kv_blocks(self, block_ids):
        return torch.zeros((1, 2, 1, len(block_ids), BS, 1), dtype=torch.uint8)

    def write_kv_blocks(self, block_ids, pages) -> None:
        pass


def agentic_bookkeeping(model: str, sessions: int, turns: int, pool_fraction: float,
                        tool_max: int) -> None:
    """A long agentic workload (4,096-token shared prefix, 20 turns) through the real
    scheduler, KV manager and warehouse files, with a scripted executor instead of the model:
    hit rates only (no compute, so no seconds)."""
    from tokenfactory.engine.core import EngineConfig, EngineCore
    from tokenfactory.engine.executor import ScriptedExecutor
    from tokenfactory.engine.warehouse import PageStore, WarehouseConnector

    tok = build_engine_core(model, kernels=None, block_size=BS, num_kv_blocks=64,
                            max_model_len=8192).tokenizer
    prompts, ideal = agentic_prompts(tok, sessions, turns, 4096, 100, tool_max)
    longest = max(len(p[-1]) for p in prompts)
    final_contexts = sum(len(p[-1]) for p in prompts)
    blocks = int(final_contexts * pool_fraction) // BS
    blocks = max(blocks, longest // BS + 8)
    print(f"\n## agentic, bookkeeping only (scripted executor): {describe(prompts, blocks, ideal)}")
    for label in ("RAM only", "RAM + warehouse"):
        core = EngineCore(ScriptedExecutor(lambda r: [], 0),
                          EngineConfig(num_kv_blocks=blocks, block_size=BS, max_model_len=32768),
                          model_max_len=32768, eos_token_ids=[0])
        with tempfile.TemporaryDirectory(prefix="tf-warehouse-") as d:
            if label != "RAM only":
                store = PageStore(d, b"bookkeeping-only", max_bytes=8 << 30)
                core.kv.attach_connector(WarehouseConnector(store, _TinyPages(), (1, 2, 1, BS, 1),
                                                            torch.uint8, async_writes=False))
            prompt_tokens, cached, _ = play(core, prompts, 16)
        print(f"{label:16s} hit rate {cached / prompt_tokens:6.1%} ({cached}/{prompt_tokens} "
              f"tokens); computed {prompt_tokens - cached} prompt tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(default_model_path()))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prefix-tokens", type=int, default=4096)
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--pool-blocks", type=int, default=None,
                    help="RAM pages for the agentic part (default: 1.25x the longest context)")
    ap.add_argument("--skip-restore", action="store_true")
    ap.add_argument("--skip-agentic", action="store_true")
    ap.add_argument("--bookkeeping", action="store_true",
                    help="only the full-size agentic hit rates with a scripted executor")
    ap.add_argument("--book-sessions", type=int, default=8)
    ap.add_argument("--book-turns", type=int, default=20)
    ap.add_argument("--book-tool-max", type=int, default=500,
                    help="longest tool result in tokens (log-uniform from 100)")
    ap.add_argument("--book-pool-fraction", type=float, default=0.25,
                    help="RAM pool as a share of the sessions' final contexts (bookkeeping)")
    args = ap.parse_args()
    print(f"model {args.model}; host shared with other work (2 cores): read ratios, not seconds")
    if args.bookkeeping:
        agentic_bookkeeping(args.model, args.book_sessions, args.book_turns,
                            args.book_pool_fraction, args.book_tool_max)
        return
    if not args.skip_restore:
        restore_vs_prefill(args.model, args.rounds, args.prefix_tokens)
    if not args.skip_agentic:
        agentic_hit_rate(args.model, args.sessions, args.turns, args.pool_blocks)


if __name__ == "__main__":
    main()
