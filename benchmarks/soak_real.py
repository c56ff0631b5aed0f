"""Soak on the real default model (issue 13): `tokenfactory serve` with SmolLM2-135M-Instruct.

    .venv/bin/python benchmarks/soak_real.py --requests 1500 --concurrency 8 --json /tmp/soak_real.json

benchmarks/soak.py drives a scripted engine (the serving stack without a forward pass); this one
runs the real CLI process on the real model, so the sampler, the tokenizer, the GGUF weights and
the native kernels see every request. The mix: Anthropic and OpenAI chat, streaming and not,
distinct prompts (each names its request number, so the prefix cache holds only the shared
system text), 10 % of streams dropped by the client after the first frames, max_tokens 4-32 at
the model's default sampling. Reported: requests, failures (non-200 other than the dropped
streams), RSS of the server after every ``--every`` requests and the growth from the first
reading to the last, KV pages in use and requests running once idle.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak import metric, rss_kib, wait_healthy  # noqa: E402  (benchmarks/soak.py: same readings)

SYSTEM = "You are a helpful assistant. Answer briefly."
TOPICS = ["the sea", "Python", "Paris", "bread", "a red bicycle", "winter", "the moon", "tea"]


def start_server(extra: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "tokenfactory.cli", "serve", "--port", str(port),
           "--max-model-len", "2048", "--kv-cache-memory", "256M", "--log-level", "warning",
           *extra]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(proc, base, timeout=180)
    return proc, base


async def one(client: httpx.AsyncClient, base: str, i: int, rng: random.Random) -> str:
    """Send request ``i``; returns "ok", "dropped" or a failure description."""
    text = f"Request {i}: write one sentence about {rng.choice(TOPICS)}."
    max_tokens = rng.randint(4, 32)
    stream = rng.random() < 0.5
    drop = stream and rng.random() < 0.2
    if rng.random() < 0.5:
        url, body = base + "/v1/messages", {
            "model": "smollm2", "max_tokens": max_tokens, "stream": stream, "system": SYSTEM,
            "messages": [{"role": "user", "content": text}]}
        headers = {"anthropic-version": "2023-06-01"}
    else:
        url, body = base + "/v1/chat/completions", {
            "model": "smollm2", "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]}
        headers = {}
    if not stream:
        r = await client.post(url, json=body, headers=headers)
        return "ok" if r.status_code == 200 else f"{r.status_code}: {r.text[:200]}"
    async with client.stream("POST", url, json=body, headers=headers) as r:
        if r.status_code != 200:
            return f"{r.status_code}: {(await r.aread())[:200]!r}"
        seen = 0
        async for line in r.aiter_lines():
            seen += 1
            if drop and seen >= 6:
                return "dropped"   # leaving the block closes the connection mid-stream
            if line.startswith("event: error") or '"error"' in line[:40]:
                return f"error event: {line[:200]}"
    return "ok"


async def run(base: str, pid: int, n: int, concurrency: int, every: int, seed: int) -> dict:
    rng = random.Random(seed)
    outcomes: dict[str, int] = {}
    failures: list[str] = []
    rss: list[tuple[int, int]] = [(0, rss_kib(pid))]
    done = 0
    next_i = 0
    async with httpx.AsyncClient(timeout=120) as client:
        async def worker():
            nonlocal done, next_i
            while next_i < n:
                i = next_i
                next_i += 1
                result = await one(client, base, i, random.Random(rng.random() + i))
                key = result if result in ("ok", "dropped") else "failed"
                outcomes[key] = outcomes.get(key, 0) + 1
                if key == "failed" and len(failures) < 10:
                    failures.append(result)
                done += 1
                if done % every == 0:
                    rss.append((done, rss_kib(pid)))
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        for _ in range(100):   # dropped streams are aborted asynchronously
            m = (await client.get(base + "/metrics")).text
            if metric(m, "tokenfactory_requests_running") == 0 and \
                    metric(m, "tokenfactory_kv_pages_used") == 0:
                break
            await asyncio.sleep(0.1)
    first, last = rss[1][1] if len(rss) > 1 else rss[0][1], rss[-1][1]
    return {"requests": n, "outcomes": outcomes, "failures": failures,
            "rss_kib": rss, "rss_growth_first_to_last_reading_pct":
                round(100.0 * (last - first) / first, 2),
            "kv_pages_used_when_idle": metric(m, "tokenfactory_kv_pages_used"),
            "requests_running_when_idle": metric(m, "tokenfactory_requests_running")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1500)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--every", type=int, default=250, help="read the server's RSS every N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the result here")
    p.add_argument("serve_args", nargs="*", help="extra `tokenfactory serve` arguments")
    args = p.parse_args()
    proc, base = start_server(args.serve_args)
    t0 = time.monotonic()
    try:
        result = asyncio.run(run(base, proc.pid, args.requests, args.concurrency, args.every,
                                 args.seed))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    result["seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    ok = (result["outcomes"].get("failed", 0) == 0 and result["kv_pages_used_when_idle"] == 0
          and result["requests_running_when_idle"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
