"""Token warehouse (issue 18) on the real model: restore speed vs prefill, and an agentic hit rate.

1. **Restore vs recompute, 4K-token prefix** (SmolLM2-135M-Instruct, bf16 KV, 16-token pages):
   interleaved rounds of (a) a cold request (empty warehouse, empty RAM cache; ``max_tokens=1``,
   so its time is the prefill), (b) the same request after the RAM cache is reset (its pages come
   from the warehouse through the OS page cache), (c) the pure restore: ``load`` of every page
   into the pool, timed alone, with the files in the page cache and again after
   ``posix_fadvise(DONTNEED)`` on each file (the bytes come from the disk).
2. **Agentic sessions with a RAM pool too small for them** (``bench.workloads.agentic``: one
   shared system prompt, a task per session, scripted assistant turns and tool results; the
   same tokens in every run), one turn at a time round robin across sessions, on an engine
   whose pool holds ~1.25 times the longest session's context, with and without the
   warehouse: hit rate (cached / prompt tokens, the usage ``cached_tokens``), as a share of
   the workload's ceiling, and engine seconds (wall and CPU) per session (task). Shapes:
   ``short`` (4 sessions x 4 turns, long tool results) and ``agent-loop`` (4 sessions x 40
   turns behind a ~2K-token shared prefix, ~114 new tokens per turn: what an agent like
   Claude Code sends, scaled to an 8K context). ``--scripted`` runs the same bookkeeping
   (scheduler, KV manager, warehouse files) with a scripted executor instead of the model:
   exact hit rates in seconds.
3. **Read-ahead** (``--concurrent N``): every session's turn queued at once, ``max_num_seqs``
   N, so turns wait while others run; the warehouse with read-ahead off and on (each queued
   request's pages read by a background thread, ``KVCacheManager.prefetch``), interleaved.

    .venv/bin/python benchmarks/warehouse.py [--rounds 3] --skip-agentic     # restore vs prefill
    .venv/bin/python benchmarks/warehouse.py --shape agent-loop --skip-restore --max-tokens 1
    .venv/bin/python benchmarks/warehouse.py --shape agent-loop --scripted
    .venv/bin/python benchmarks/warehouse.py --shape agent-loop --turns 16 --skip-restore
        --skip-sequential --concurrent 1 --rounds 2 --max-tokens 4        # (one command)

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
from dataclasses import dataclass, replace

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


def admission_load(model: str, rounds: int, prefix_tokens: int) -> None:
    """What read-ahead takes off the engine thread: the time ``load`` spends at admission for a
    ``prefix_tokens`` prefix whose pages are only on disk (read, verified and copied into the
    pool), against the same ``load`` after ``prefetch`` read them in the background (only the
    copy left). Interleaved rounds; the files are in the OS page cache in both."""
    core = build_engine_core(model, kernels=None, block_size=BS,
                             num_kv_blocks=prefix_tokens // BS + 16, max_model_len=8192)
    rng = random.Random(1)
    prompt = [rng.randrange(100, 49000) for _ in range(prefix_tokens + 1)]
    n_blocks = prefix_tokens // BS
    toks = [prompt[i * BS:(i + 1) * BS] for i in range(n_blocks)]
    hashes, parent = [], None
    for block in toks:
        parent = hash_block(parent, block)
        hashes.append(parent)
    sync, ahead, background = [], [], []
    with tempfile.TemporaryDirectory(prefix="tf-warehouse-") as d:
        wh = open_warehouse(core.executor, d, max_bytes=8 << 30, prefetch_bytes=1 << 30)
        core.kv.attach_connector(wh)
        run(core, "fill", prompt)
        wh.flush()
        pool = core.kv.pool
        for _ in range(rounds):
            for label in ("sync", "read ahead"):
                core.reset_prefix_cache()
                if label == "read ahead":
                    t = time.perf_counter()
                    wh.prefetch(hashes, toks)
                    wh.wait_prefetched()
                    background.append(time.perf_counter() - t)
                blocks = pool.allocate(n_blocks)
                t = time.perf_counter()
                got = wh.load(hashes, blocks, toks)
                (sync if label == "sync" else ahead).append(time.perf_counter() - t)
                pool.free_blocks(blocks)
                assert got == n_blocks, got
        wh.close()
    med = statistics.median
    print(f"\n## admission load of a {prefix_tokens}-token prefix from the warehouse, {rounds} "
          f"interleaved rounds (median [runs])")
    print(f"synchronous (read + verify + copy on the engine thread): {med(sync):.3f} s "
          f"{[round(x, 3) for x in sync]}")
    print(f"after read-ahead (copy only):                            {med(ahead):.3f} s "
          f"{[round(x, 3) for x in ahead]}  -> {med(sync) / med(ahead):.1f}x less")
    print(f"the read-ahead itself (background thread):               {med(background):.3f} s "
          f"{[round(x, 3) for x in background]}")


@dataclass(frozen=True)
class AgentShape:
    """Parameters of ``bench.workloads.agentic`` for one agentic run."""
    sessions: int
    turns: int
    prefix_tokens: int     # shared system prompt (and tool schemas), identical in every session
    tool_min: int          # tool results: log-uniform between these, in tokens
    tool_max: int
    output_tokens: int     # the scripted assistant turn is about half of this


SHAPES = {
    # the first measurements: short sessions, long tool results (ceiling 65.6%)
    "short": AgentShape(4, 4, 512, 100, 300, 16),
    # an agent loop as Claude Code drives one, scaled to SmolLM2's 8K context: a shared
    # prefix, many turns, each adding a tool call and a mostly short tool result (~2-3% of the
    # context per turn, as ~1K tokens per turn over a 20-100K context do in real sessions)
    "agent-loop": AgentShape(4, 40, 3072, 10, 80, 32),
}


def agentic_prompts(tok, shape: AgentShape) -> tuple[list[list[list[int]]], float]:
    """Token ids per [session][turn] of ``bench.workloads.agentic`` (scripted assistant turns,
    so every run sends the same prompts), and the hit rate of an unbounded cache: the
    workload's ceiling (tokens new in a turn, and each prompt's partial last block, cannot
    hit in any tier)."""
    wl = agentic(seed=0, sessions=shape.sessions, turns=shape.turns,
                 prefix_tokens=shape.prefix_tokens, tool_min=shape.tool_min,
                 tool_max=shape.tool_max, output_tokens=shape.output_tokens)
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
    for turn in range(shape.turns):
        for s in range(shape.sessions):
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
    new = [len(p[t]) - len(p[t - 1]) for p in prompts for t in range(1, len(p))]
    return (f"{len(prompts)} sessions x {len(prompts[0])} turns ({n} requests), shared prefix + "
            f"first turn {len(prompts[0][0])} tokens, {statistics.mean(new):.0f} new tokens per "
            f"later turn (median {statistics.median(new):.0f}), longest context {longest} tokens; "
            f"RAM pool {blocks} pages ({blocks * BS} tokens); ceiling (an unbounded cache) "
            f"{ideal:.1%}")


@dataclass
class Tally:
    prompt_tokens: int = 0
    cached: int = 0
    wall: float = 0.0      # seconds the engine took (this process, shared host)
    cpu: float = 0.0       # CPU seconds of this process, all threads (warehouse I/O included)

    def line(self, label: str, sessions: int, ideal: float, warehouse_hits: int) -> str:
        rate = self.cached / self.prompt_tokens
        return (f"{label:28s} hit rate {rate:6.1%} = {rate / ideal:6.1%} of the ceiling "
                f"({self.cached}/{self.prompt_tokens} tokens; warehouse {warehouse_hits}); "
                f"computed {self.prompt_tokens - self.cached} prompt tokens; "
                f"{self.wall:7.1f} s, {self.cpu:7.1f} CPU-s; per task {self.wall / sessions:6.2f} "
                f"machine-s, {self.cpu / sessions:6.2f} CPU-s")


def play(core, prompts, max_tokens: int) -> Tally:
    """One turn per session, round robin, one request at a time (agents wait for their tool
    results)."""
    tally = Tally()
    t, c = time.perf_counter(), time.process_time()
    for turn in range(len(prompts[0])):
        for s, per_turn in enumerate(prompts):
            out = run(core, f"s{s}-t{turn}", per_turn[turn], max_tokens=max_tokens)
            tally.prompt_tokens += len(per_turn[turn])
            tally.cached += out.num_cached_tokens
    tally.wall, tally.cpu = time.perf_counter() - t, time.process_time() - c
    return tally


def play_concurrent(core, prompts, max_tokens: int, prefetch: bool) -> Tally:
    """Every session's turn queued at once, turn after turn (the agents' tools finish
    together): with ``max_num_seqs`` below the sessions, some turns wait in the queue while
    others run, and by a session's next turn the others have pushed its pages out of RAM.
    ``prefetch``: each queued request's pages are read ahead (``KVCacheManager.prefetch``,
    what ``EngineCore.add_request`` would call)."""
    tally = Tally()
    t, c = time.perf_counter(), time.process_time()
    for turn in range(len(prompts[0])):
        for s, per_turn in enumerate(prompts):
            req = core.add_request(f"s{s}-t{turn}", per_turn[turn], SamplingParams(
                temperature=0, max_tokens=max_tokens, ignore_eos=True))
            tally.prompt_tokens += len(per_turn[turn])
            if prefetch:
                core.kv.prefetch(req)
        while core.has_unfinished_requests():
            for out in core.step():
                if out.finished:
                    tally.cached += out.num_cached_tokens
    tally.wall, tally.cpu = time.perf_counter() - t, time.process_time() - c
    return tally


class _TinyPages:
    """A KVPageIO with 32-byte pages: the scripted runs store real page files without a model
    behind them."""

    def read_kv_blocks(self, block_ids):
        return torch.zeros((1, 2, 1, len(block_ids), BS, 1), dtype=torch.uint8)

    def write_kv_blocks(self, block_ids, pages) -> None:
        pass


def agentic_hit_rate(model: str, shape: AgentShape, pool_blocks: int | None, scripted: bool,
                     max_tokens: int, concurrent: int, rounds: int,
                     sequential: bool = True) -> None:
    """RAM only vs RAM + warehouse on one agentic shape: hit rate (also as a share of the
    ceiling) and seconds per session (task). ``scripted``: a scripted executor instead of
    the model (hit rates only; its seconds are bookkeeping). ``concurrent`` > 0: then also
    every session in flight with that ``max_num_seqs``, read-ahead off and on (interleaved,
    ``rounds`` times)."""
    from tokenfactory.engine.core import EngineConfig, EngineCore
    from tokenfactory.engine.executor import ScriptedExecutor
    from tokenfactory.engine.warehouse import PageStore, WarehouseConnector

    tok = build_engine_core(model, kernels=None, block_size=BS, num_kv_blocks=64,
                            max_model_len=8192).tokenizer
    prompts, ideal = agentic_prompts(tok, shape)
    longest = max(len(p[-1]) for p in prompts)
    blocks = pool_blocks or (longest * 5 // 4) // BS

    def engine(num_blocks: int, warehouse_dir: str | None, max_num_seqs: int = 64):
        if scripted:
            core = EngineCore(ScriptedExecutor(lambda r: [], 0),
                              EngineConfig(num_kv_blocks=num_blocks, block_size=BS,
                                           max_model_len=8192, max_num_seqs=max_num_seqs),
                              model_max_len=8192, eos_token_ids=[0])
            wh = None if warehouse_dir is None else WarehouseConnector(
                PageStore(warehouse_dir, b"scripted-pages-1", max_bytes=8 << 30), _TinyPages(),
                (1, 2, 1, BS, 1), torch.uint8, async_writes=False)   # steps take no time
        else:
            core = build_engine_core(model, kernels=None, block_size=BS, num_kv_blocks=num_blocks,
                                     max_model_len=8192, max_num_seqs=max_num_seqs)
            wh = None if warehouse_dir is None else open_warehouse(core.executor, warehouse_dir,
                                                                   max_bytes=8 << 30)
        if wh is not None:
            core.kv.attach_connector(wh)
        return core, wh

    kind = "scripted executor" if scripted else "the real model"
    print(f"\n## agentic ({kind}), max_tokens {max_tokens}: {describe(prompts, blocks, ideal)}")
    for label in ("RAM only", "RAM + warehouse") if sequential else ():
        with tempfile.TemporaryDirectory(prefix="tf-warehouse-") as d:
            core, wh = engine(blocks, None if label == "RAM only" else d)
            tally = play(core, prompts, max_tokens)
            dropped = ""
            if wh is not None:
                dropped = f"; saves dropped {wh.stats()['dropped_saves']}"
                wh.close()
        print(tally.line(label, shape.sessions, ideal, core.kv.stats().connector_hits) + dropped,
              flush=True)
        del core
    if not concurrent:
        return
    cblocks = (longest * concurrent * 5 // 4) // BS
    print(f"\n## all {shape.sessions} sessions in flight, max_num_seqs {concurrent}, RAM pool "
          f"{cblocks} pages, warehouse; read-ahead off/on interleaved, {rounds} round(s)")
    for r in range(rounds):
        for prefetch in (False, True):
            with tempfile.TemporaryDirectory(prefix="tf-warehouse-") as d:
                core, wh = engine(cblocks, d, max_num_seqs=concurrent)
                tally = play_concurrent(core, prompts, max_tokens, prefetch)
                stats = wh.stats()
                wh.close()
            print(tally.line(f"round {r} read-ahead {'on' if prefetch else 'off'}",
                             shape.sessions, ideal, core.kv.stats().connector_hits)
                  + f"; pages read ahead {stats['pages_prefetched']}, used "
                    f"{stats['prefetch_hits']}; saves dropped {stats['dropped_saves']}", flush=True)
            del core


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(default_model_path()))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prefix-tokens", type=int, default=4096)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="short",
                    help="the agentic workload (default: short)")
    ap.add_argument("--sessions", type=int, default=None)
    ap.add_argument("--turns", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=16, help="output tokens per turn")
    ap.add_argument("--pool-blocks", type=int, default=None,
                    help="RAM pages for the agentic part (default: 1.25x the longest context)")
    ap.add_argument("--scripted", action="store_true",
                    help="agentic hit rates with a scripted executor instead of the model")
    ap.add_argument("--concurrent", type=int, default=0, metavar="MAX_NUM_SEQS",
                    help="also run every session at once with this max_num_seqs, read-ahead "
                         "off and on")
    ap.add_argument("--admission-load", action="store_true",
                    help="only the admission load with and without read-ahead")
    ap.add_argument("--skip-sequential", action="store_true",
                    help="agentic: only the --concurrent runs")
    ap.add_argument("--skip-restore", action="store_true")
    ap.add_argument("--skip-agentic", action="store_true")
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    shape = replace(shape, sessions=args.sessions or shape.sessions,
                    turns=args.turns or shape.turns)
    print(f"model {args.model}; host shared with other work (2 cores): read ratios, not seconds")
    if args.admission_load:
        admission_load(args.model, args.rounds, args.prefix_tokens)
        return
    if not args.skip_restore and not args.scripted:
        restore_vs_prefill(args.model, args.rounds, args.prefix_tokens)
    if not args.skip_agentic:
        agentic_hit_rate(args.model, shape, args.pool_blocks, args.scripted, args.max_tokens,
                         args.concurrent, args.rounds, not args.skip_sequential)


if __name__ == "__main__":
    main()
