"""Long soak with faults (issue 6): >= 10,000 mixed requests against a real server process.

    .venv/bin/python benchmarks/soak.py --requests 10000 --concurrency 16

The server is a separate process (this script with ``--serve``): uvicorn around an engine driven
by the scripted executor of tests/robustness (real scheduling, KV pages, detokenizer, SSE; the
"model" replays scripted answers), so the run measures the serving stack, not a forward pass.
The client mix is tests/robustness/test_soak.py's: Anthropic and OpenAI, streaming and not,
20 % of clients disconnecting at a random point mid-stream, max_tokens at the context limit,
stop sequences, tool calls. Every completed response is checked for completeness and stop
reason. Reported: requests run, disconnects injected, failures, 5xx seen, KV pages in use and
requests stuck once idle, and the server's RSS after each thousand requests (growth between
the first and the last thousand). Before the measured requests, a warm-up fills the tokenizer's
per-thread word caches, a bounded one-time fill (see WARMUP_REQUESTS; --no-warmup skips it).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests package: the soak reuses its scenarios


def serve(port: int, max_queued: int | None, malloc_trim_interval: float | None) -> None:
    """The server process: scripted engine + the real app on 127.0.0.1:port."""
    import tempfile

    import uvicorn

    from tests.live import make_engine
    from tests.robustness.test_soak import SOAK_MODEL_LEN
    from tokenfactory.api.server import create_app
    from tokenfactory.text.demo_tokenizer import train_demo_tokenizer

    tok = train_demo_tokenizer(tempfile.mkdtemp(prefix="tf-soak-tok-"))
    engine = make_engine(tok, model_len=SOAK_MODEL_LEN, num_blocks=1024, max_num_seqs=32,
                         max_queued_requests=max_queued, record_work=False)
    trim = {} if malloc_trim_interval is None else {"malloc_trim_interval": malloc_trim_interval}
    app = create_app(engine, tok, served_model_name="tf-test", ping_interval=1.0,
                     aliases=[("claude-*", "tf-test")], **trim)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def start_server(max_queued: int | None = None,
                 malloc_trim_interval: float | None = None) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, __file__, "--serve", "--port", str(port)]
    if max_queued is not None:
        args += ["--max-queued-requests", str(max_queued)]
    if malloc_trim_interval is not None:
        args += ["--malloc-trim-interval", str(malloc_trim_interval)]
    proc = subprocess.Popen(args, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    wait_healthy(proc, base, timeout=120)
    return proc, base


def wait_healthy(proc: subprocess.Popen, base: str, timeout: float) -> None:
    """Poll ``base``/health until it answers 200; the server is killed if it never does."""
    import httpx
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError("server exited during start-up")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not start")
        time.sleep(0.2)


# The warm-up before the measured requests: a bounded one-time fill of the tokenizer's word
# caches, which the metric would otherwise count as growth. tokenizers >= 0.23 keep a BPE word
# cache per thread (thread-local, at most 10,000 words, never freed) and the soak's prompts each
# carry a new number ("request 1234"), so without this the caches of the server's prompt threads
# (api/serving.py off_loop: 2 threads) fill throughout the run: ~330 bytes a word, ~3.3 MiB per
# thread at most, +3.1-3.2 MiB over 10,000 requests (robustness.md). 60 count_tokens requests
# of 1,000 distinct numbers each offer ~30,000 new words to each prompt thread: both caches end
# up full. --no-warmup skips it, to see the fill.
WARMUP_REQUESTS = 60
WARMUP_WORDS_PER_REQUEST = 1_000


async def fill_word_caches(base: str, concurrency: int) -> dict:
    import httpx

    from tests.live import HEADERS
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300) as client:
        async def one(k: int) -> None:
            first = 1_000_000 + k * WARMUP_WORDS_PER_REQUEST
            text = " ".join(str(first + j) for j in range(WARMUP_WORDS_PER_REQUEST))
            async with sem:
                r = await client.post(base + "/v1/messages/count_tokens", headers=HEADERS, json={
                    "model": "tf-test", "messages": [{"role": "user", "content": text}]})
            r.raise_for_status()
        await asyncio.gather(*[one(k) for k in range(WARMUP_REQUESTS)])
    return {"requests": WARMUP_REQUESTS,
            "distinct_words": WARMUP_REQUESTS * WARMUP_WORDS_PER_REQUEST}


async def run_soak(base: str, pid: int, n: int, concurrency: int, seed: int) -> dict:
    import httpx

    from tests.robustness.test_soak import make_plans, run_one
    plans = make_plans(n, seed=seed)
    statuses: dict[int, int] = {}
    failures: list[str] = []
    stats = {"completed": 0, "disconnected": 0}
    rss: list[tuple[int, int]] = [(0, rss_kib(pid))]
    done = 0
    next_index = 0

    async def on_response(response):
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits,
                                 event_hooks={"response": [on_response]}) as client:
        async def worker():
            nonlocal done, next_index
            while next_index < len(plans):
                plan = plans[next_index]
                next_index += 1
                try:
                    await run_one(client, base, plan, stats)
                except Exception as exc:   # noqa: BLE001 - counted and reported
                    failures.append(f"{plan}: {type(exc).__name__}: {str(exc)[:300]}")
                done += 1
                if done % 1000 == 0:
                    rss.append((done, rss_kib(pid)))
                    print(f"  {done:6d} requests, server RSS {rss[-1][1] / 1024:.1f} MiB",
                          flush=True)
        t0 = time.monotonic()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        elapsed = time.monotonic() - t0
        # idle: wait for aborts to land, then read the engine's books
        for _ in range(200):
            m = (await client.get(base + "/metrics")).text
            if metric(m, "tokenfactory_requests_running") == 0 and \
                    metric(m, "tokenfactory_kv_pages_used") == 0:
                break
            await asyncio.sleep(0.05)
    n_disc = sum(p.scenario == "disconnect" for p in plans)
    first, last = rss[1][1], rss[-1][1]
    return {
        "requests_run": done, "completed_and_checked": stats["completed"],
        "disconnects_injected": n_disc, "disconnects_done": stats["disconnected"],
        "failures": len(failures), "failure_samples": failures[:5],
        "status_counts": {str(k): v for k, v in sorted(statuses.items())},
        "http_5xx": sum(v for k, v in statuses.items() if k >= 500),
        "kv_pages_used_when_idle": metric(m, "tokenfactory_kv_pages_used"),
        "kv_pages_total": metric(m, "tokenfactory_kv_pages_total"),
        "requests_running_when_idle": metric(m, "tokenfactory_requests_running"),
        "requests_waiting_when_idle": metric(m, "tokenfactory_requests_waiting"),
        "rss_mib_after_each_1000": [round(r / 1024, 1) for _, r in rss[1:]],
        "rss_growth_first_to_last_1000_pct": round(100.0 * (last - first) / first, 2),
        "elapsed_s": round(elapsed, 1), "requests_per_s": round(done / elapsed, 1),
        "concurrency": concurrency, "seed": seed,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seed", type=int, default=6)
    p.add_argument("--json", help="write the results here too")
    p.add_argument("--malloc-trim-interval", type=float, default=None, metavar="SECONDS",
                   help="the server's malloc_trim interval (default: the product's, see "
                        "src/tokenfactory/api/memory.py; 0 turns its allocator settings off, "
                        "for comparison)")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip filling the tokenizer's word caches before the measured requests")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--max-queued-requests", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.port, args.max_queued_requests, args.malloc_trim_interval)
        return 0
    proc, base = start_server(malloc_trim_interval=args.malloc_trim_interval)
    try:
        print(f"soak: {args.requests} requests, concurrency {args.concurrency}, server pid "
              f"{proc.pid} at {base}", flush=True)
        warmup = (None if args.no_warmup
                  else asyncio.run(fill_word_caches(base, args.concurrency)))
        result = asyncio.run(run_soak(base, proc.pid, args.requests, args.concurrency,
                                      args.seed))
        result["warmup"] = warmup
        result["malloc_trim_interval"] = args.malloc_trim_interval   # None: the product default
    finally:
        proc.terminate()
        proc.wait(60)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    ok = (result["failures"] == 0 and result["http_5xx"] == 0
          and result["kv_pages_used_when_idle"] == 0 and result["requests_running_when_idle"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
