"""The router at fleet scale (issue 17): N simulated replicas (real EngineCore + scheduler +
block pool on the roofline SimulatedExecutor), a replayed agentic trace, every routing policy.

Reports per policy: prefix-cache hit rate (cached / prompt tokens, as the engines count them),
load imbalance (max / mean requests per replica), the simulated makespan, and the trace's hit
rate ceiling (every turn reusing all full blocks of the previous turn's prompt, every first
turn reusing its agent's system prompt: what a single replica with an infinite cache gets).
Goal: prefix routing >= 85% hits with imbalance <= 1.25 at 64 replicas.

    .venv/bin/python benchmarks/router_sim.py [--replicas 64] [--sessions 1000]
        [--policies prefix,round-robin,least-loaded] [--json out.json]

Simulated time, so the figures do not depend on the host; wall time does (the engines run
for real: ~2-8 minutes per policy at 64 x 1,000 on a shared 2-core host).

``--pd-transfer`` measures instead the disaggregated prefill -> decode page transfer on real
Ray replicas of the default model (SmolLM2-135M, bf16 KV; one prefill and one decode replica,
one thread each) for a few prompt sizes, beside the planner's ``kv_transfer_seconds`` at this
host's measured copy bandwidth:

    .venv/bin/python benchmarks/router_sim.py --pd-transfer
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict

from tokenfactory.router.policy import POLICIES, LoadBound
from tokenfactory.router.simulate import SimConfig, agentic_trace, simulate, trace_hit_ceiling


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=64)
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--groups", type=int, default=8, help="agents (distinct system prompts)")
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--arrival-rate", type=float, default=100.0, help="sessions per second")
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--hardware", default="h100")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here as JSON")
    p.add_argument("--pd-transfer", action="store_true",
                   help="measure the prefill -> decode page transfer on Ray replicas instead")
    args = p.parse_args(argv)
    if args.pd_transfer:
        return pd_transfer()
    logging.disable(logging.WARNING)   # a failed simulated step would be a bug: see the counts

    t0 = time.time()
    trace = agentic_trace(args.sessions, groups=args.groups, turns=args.turns,
                          output_tokens=args.output_tokens, arrival_rate=args.arrival_rate,
                          seed=args.seed)
    ceiling = trace_hit_ceiling(trace)
    print(f"trace: {len(trace)} sessions, {sum(len(s.turns) for s in trace)} requests, "
          f"hit-rate ceiling {ceiling:.1%} ({time.time() - t0:.0f} s to build)", flush=True)
    rows = []
    print(f"{'policy':<14}{'hit rate':>9}{'imbalance':>11}{'makespan s':>12}{'leaked':>8}"
          f"{'wall s':>8}  requests per replica (min..max)")
    for policy in args.policies.split(","):
        t = time.time()
        r = simulate(trace, SimConfig(num_replicas=args.replicas, policy=policy,
                                      model=args.model, hardware=args.hardware))
        wall = time.time() - t
        rows.append({**asdict(r), "hit_rate": r.hit_rate, "imbalance": r.imbalance,
                     "wall_seconds": wall})
        print(f"{policy:<14}{r.hit_rate:>9.1%}{r.imbalance:>11.3f}{r.makespan_seconds:>12.1f}"
              f"{r.leaked_pages:>8}{wall:>8.0f}  {min(r.requests_per_replica)}.."
              f"{max(r.requests_per_replica)}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "ceiling": ceiling, "bound": asdict(LoadBound()),
                       "results": rows}, f, indent=1)
    return 0


def pd_transfer(sizes=(512, 1024, 2048, 2048, 1024, 512)) -> int:
    import asyncio
    import random

    from tokenfactory.economics.host import measure_host
    from tokenfactory.engine.sampling_params import SamplingParams
    from tokenfactory.model.default import default_model_path
    from tokenfactory.router.engine import RouterEngine
    from tokenfactory.router.replica import ReplicaSpec

    logging.disable(logging.WARNING)
    spec = ReplicaSpec(str(default_model_path()),
                       engine_args=dict(num_kv_blocks=512, max_model_len=4096),
                       dtype="bfloat16", kernels="torch", threads=1)
    router = RouterEngine.launch(spec, 1, num_prefill_replicas=1, num_cpus=2)
    info = router.info
    router.poll_once()
    router.start()
    rng = random.Random(0)

    async def run() -> None:
        for i, n in enumerate(sizes):
            ids = [rng.randrange(100, 40000) for _ in range(n)]
            outs = [o async for o in router.generate(f"pd{i}", ids,
                                                     SamplingParams(max_tokens=1))]
            t = router.transfers[-1]
            moved = t.tokens // info.block_size * info.kv_cache_bytes_per_block
            total = t.export_seconds + t.seconds
            print(f"prompt {n}: moved {t.tokens} tokens ({moved / 2**20:.1f} MiB), export "
                  f"{t.export_seconds * 1e3:.1f} ms, hop {t.seconds * 1e3:.1f} ms, "
                  f"{total / t.tokens * 1e6:.1f} us/token, {moved / total / 1e9:.2f} GB/s; "
                  f"cached on the decode replica {outs[-1].num_cached_tokens}", flush=True)
    try:
        asyncio.run(run())
    finally:
        router.shutdown()
    host = measure_host(2.0, threads=1)
    per_token = info.kv_cache_bytes_per_block / info.block_size
    print(f"host copy bandwidth (measure_host, 1 thread): {host.bandwidth_bytes_per_s / 1e9:.1f}"
          f" GB/s; {per_token:.0f} KV bytes per token; kv_transfer_seconds at that bandwidth: "
          f"{per_token / host.bandwidth_bytes_per_s * 1e6:.1f} us/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
