"""Time to first token and batch-1 inter-token latency of a short chat request: tokenfactory
against llama.cpp's `llama-server`, same GGUF file, one request at a time (issue 20).

Each server is started on a free loopback port (or an already running one is measured,
``--ours-url`` / ``--llama-url``). After ``--warmup`` requests each, ``--requests`` rounds are
sent; a round is one streamed ``/v1/chat/completions`` request to each server in turn (the
first server alternates from round to round), with the same messages: a ~60-token chat prompt
(the model's own template and default system turn, a ~35-word question that differs per round),
``max_tokens`` 32, temperature 0, ``ignore_eos`` (both servers honour it), so every request
streams exactly 32 tokens, one per chunk on both servers.

Per request:

  TTFT     send -> first chunk carrying content (client clock, ``time.perf_counter``)
  ITL      gaps between consecutive content chunks (pooled over the requests)
  CPU      CPU time the server process used (every thread: the sum of
           ``/proc/PID/task/*/schedstat``, ns) from send to first content chunk and from send
           to the end of the stream, and of that the main thread's (ours: the HTTP event
           loop; llama-server: its main thread). On a shared host this is the steadier
           figure: it counts only the server's own work (OpenMP / llama.cpp threads spinning
           while they wait for work count too, on both sides)
  stages   ours only: the request's station trace from ``GET /v1/trace/{request-id}``
           (api/trace.py): receive, tokenize, route, queue, prefill (and its busy time),
           decode (steps, busy time), detokenize, stream_out, each station's ``self_s``

Threads: by default both servers use every core (``-t $(nproc)`` for llama-server; ours its
defaults: prefill on all cores, batch-1 decode on one core fewer). ``--cpus 1`` runs both
under ``taskset -c 1`` (and llama-server with ``-t 1``), the one-core comparison.

    .venv/bin/python benchmarks/ttft.py --requests 20 --json /tmp/ttft.json
    .venv/bin/python benchmarks/ttft.py --requests 20 --cpus 1
    .venv/bin/python benchmarks/ttft.py --requests 20 --ours-args "--quantization gguf"
    # A/B of two trees of ours (e.g. `git archive BASE src | tar -x -C /tmp/base`), interleaved:
    .venv/bin/python benchmarks/ttft.py --targets ours,ours-b --ours-b-src /tmp/base/src --cpus 1
    # issue 15's concurrent-streams A/B: 16 requests at once per round (CPU per request is
    # the round's share; TTFT then includes queueing behind the other 15 prefills)
    .venv/bin/python benchmarks/ttft.py --targets ours,ours-b --ours-b-src /tmp/base/src \
        --concurrency 16 --requests 6
    # A/B of a serve flag on this tree:
    .venv/bin/python benchmarks/ttft.py --targets ours,ours-b --ours-b-args "--decode-threads 0"

On a busy host llama-server with more than one thread collapses (its threads spin-wait at
every barrier for a descheduled sibling: seconds to the first token, see benchmarks/peers/
README.md); compare there with ``--cpus 1`` and read the CPU columns, or wait for a quiet host.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from real_model_peer import PEERS, Server  # noqa: E402

from tokenfactory.bench.client import sse_events  # noqa: E402
from tokenfactory.bench.metrics import percentile  # noqa: E402
from tokenfactory.bench.targets import free_port  # noqa: E402

TOPICS = ("photosynthesis", "compound interest", "how vaccines train the immune system",
          "why the sky looks blue", "how a refrigerator moves heat", "the water cycle",
          "what a binary search does", "how tides follow the moon", "supply and demand",
          "how bridges carry heavy loads", "what inflation means for savings",
          "how plants know when to flower", "why bread dough rises",
          "how a compass finds north", "what a database index is for",
          "how noise cancelling headphones work")
STAGES = ("receive", "tokenize", "route", "queue", "prefill", "decode", "detokenize",
          "stream_out")


def messages(i: int) -> list[dict]:
    """Round ``i``'s conversation: one user turn of ~35 words (the template adds its system
    turn), different per round so no request is a copy of an earlier one."""
    topic = TOPICS[i % len(TOPICS)]
    return [{"role": "user", "content":
             f"Question {i}: in three short sentences, explain {topic} to a curious student who "
             f"has never heard of it, then give one everyday example that makes the idea easy "
             f"to remember."}]


def cpu_ns(pid: int) -> tuple[int, int]:
    """(CPU time of every thread of ``pid`` so far, of its main thread), ns (schedstat: run
    time on a CPU). Ours runs its HTTP event loop on the main thread."""
    total = main = 0
    base = f"/proc/{pid}/task"
    for tid in os.listdir(base):
        try:
            with open(f"{base}/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):   # a thread that just ended
            continue
        total += ns
        if tid == str(pid):
            main = ns
    return total, main


@dataclass
class Record:
    target: str
    round: int
    ok: bool = False
    error: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itls_s: list[float] = field(default_factory=list)
    chunks: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    cpu_first_s: float | None = None     # server CPU, send -> first content chunk
    cpu_total_s: float | None = None     # server CPU, send -> end of stream
    cpu_main_s: float | None = None      # of which its main thread (ours: the event loop)
    request_id: str | None = None
    stages: dict | None = None           # ours: station -> self_s, plus a few extras
    text: str = ""


@dataclass
class Target:
    name: str
    url: str
    pid: int | None
    server: Server | None = None


async def one_request(client: httpx.AsyncClient, target: Target, model: str, i: int,
                      max_tokens: int, measure_cpu: bool = True) -> Record:
    rec = Record(target.name, i)
    body = {"model": model, "messages": messages(i), "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    pid = target.pid if measure_cpu else None
    c0 = cpu_ns(pid) if pid else None
    t0 = time.perf_counter()
    last = None
    parts: list[str] = []
    try:
        async with client.stream("POST", target.url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                rec.error = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
                return rec
            rec.request_id = r.headers.get("request-id")
            async for _, data in sse_events(r):
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                obj = json.loads(data)
                if obj.get("usage"):
                    u = obj["usage"]
                    rec.prompt_tokens = int(u.get("prompt_tokens") or 0)
                    rec.completion_tokens = int(u.get("completion_tokens") or 0)
                    rec.cached_tokens = int((u.get("prompt_tokens_details") or {})
                                            .get("cached_tokens") or 0)
                    if not rec.cached_tokens and obj.get("timings"):   # llama-server
                        rec.cached_tokens = int(obj["timings"].get("cache_n") or 0)
                text = "".join((ch.get("delta") or {}).get("content") or ""
                               for ch in obj.get("choices") or [])
                if not text:
                    continue
                if last is None:
                    rec.ttft_s = now - t0
                    if pid:
                        rec.cpu_first_s = (cpu_ns(pid)[0] - c0[0]) / 1e9
                else:
                    rec.itls_s.append(now - last)
                last = now
                rec.chunks += 1
                parts.append(text)
    except (httpx.HTTPError, OSError, json.JSONDecodeError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
        return rec
    rec.e2e_s = time.perf_counter() - t0
    if pid:
        c1 = cpu_ns(pid)
        rec.cpu_total_s, rec.cpu_main_s = (c1[0] - c0[0]) / 1e9, (c1[1] - c0[1]) / 1e9
    rec.text = "".join(parts)
    rec.ok = rec.ttft_s is not None and rec.completion_tokens == max_tokens
    if not rec.ok:
        rec.error = f"{rec.completion_tokens} completion tokens (asked {max_tokens})"
    return rec


async def fetch_stages(client: httpx.AsyncClient, target: Target, rec: Record) -> None:
    """Our server's station trace of ``rec`` (None where the server keeps none)."""
    if not rec.request_id:
        return
    r = await client.get(f"{target.url}/v1/trace/{rec.request_id}")
    if r.status_code != 200:
        return
    doc = r.json()
    spans = {s["name"]: s for s in doc["spans"] if s["parent_id"] in (0, None)}
    st = {name: spans[name]["self_s"] for name in STAGES if name in spans}
    pre, dec = spans.get("prefill", {}), spans.get("decode", {})
    st["prefill_busy_s"] = (pre.get("attributes") or {}).get("busy_s")
    st["prefill_chunks"] = (pre.get("attributes") or {}).get("chunks")
    attrs = dec.get("attributes") or {}
    st["decode_steps"] = attrs.get("steps")
    st["decode_busy_per_step_s"] = (attrs["busy_s"] / attrs["steps"]
                                    if attrs.get("steps") else None)
    # wall time per decode step (busy + the engine's own Python around each step)
    if attrs.get("steps") and dec.get("duration_s") is not None:
        st["decode_wall_per_step_s"] = dec["duration_s"] / attrs["steps"]
    stream = spans.get("stream_out", {})
    st["first_body_byte_s"] = (stream.get("attributes") or {}).get("first_body_byte_s")
    rec.stages = st


def med(values) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(recs: list[Record]) -> dict:
    ok = [r for r in recs if r.ok]
    gaps = [g for r in ok for g in r.itls_s]
    out = {"requests": len(recs), "ok": len(ok),
           "prompt_tokens": med(r.prompt_tokens for r in ok),
           "cached_tokens": med(r.cached_tokens for r in ok),
           "ttft_p50_ms": _ms(percentile([r.ttft_s for r in ok], 50)),
           "ttft_p90_ms": _ms(percentile([r.ttft_s for r in ok], 90)),
           "itl_p50_ms": _ms(percentile(gaps, 50)),
           "itl_p90_ms": _ms(percentile(gaps, 90)),
           "cpu_first_ms": _ms(med(r.cpu_first_s for r in ok)),
           "cpu_request_ms": _ms(med(r.cpu_total_s for r in ok)),
           "cpu_main_thread_ms": _ms(med(r.cpu_main_s for r in ok))}
    staged = [r.stages for r in ok if r.stages]
    if staged:
        keys = dict.fromkeys(k for s in staged for k in s)
        out["stages_p50"] = {k: med(s.get(k) for s in staged) for k in keys}
    return out


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1e3, 2)


async def one_round(client: httpx.AsyncClient, target: Target, model: str, i: int,
                    args) -> list[Record]:
    """One request, or ``--concurrency`` requests at once (each then gets an equal share of
    the server CPU the round took; no CPU-to-first-token figure)."""
    n = args.concurrency
    if n <= 1:
        return [await one_request(client, target, model, i, args.max_tokens)]
    c0 = cpu_ns(target.pid) if target.pid else None
    recs = await asyncio.gather(*(one_request(client, target, model, i * n + j,
                                              args.max_tokens, measure_cpu=False)
                                  for j in range(n)))
    if c0 is not None:
        c1 = cpu_ns(target.pid)
        for rec in recs:
            rec.cpu_total_s, rec.cpu_main_s = (c1[0] - c0[0]) / n / 1e9, (c1[1] - c0[1]) / n / 1e9
    return list(recs)


def make_target(name: str, args, gguf: Path) -> Target:
    if name == "ours" and args.ours_url:
        return Target(name, args.ours_url.rstrip("/"), args.ours_pid)
    if name == "llama" and args.llama_url:
        return Target(name, args.llama_url.rstrip("/"), args.llama_pid)
    port = free_port()
    cpus = args.cpus
    prefix = ["taskset", "-c", cpus] if cpus else []
    threads = len(_cpu_list(cpus)) if cpus else os.cpu_count()
    env: dict[str, str] = {}
    if name == "llama":
        cmd = [str(PEERS / "run_llama_server.sh"), str(gguf), str(port),
               str(max(1, args.concurrency)), "4096"]
        env = {"THREADS": str(threads)}
        extra = shlex.split(args.llama_args)
    else:
        src = args.ours_b_src if name == "ours-b" else args.ours_src
        cmd = [sys.executable, "-m", "tokenfactory.cli", "serve", "--model", str(gguf),
               "--host", "127.0.0.1", "--port", str(port)]
        if src:
            env = {"PYTHONPATH": str(Path(src).resolve())}
        extra = shlex.split(args.ours_b_args if name == "ours-b" else args.ours_args)
    if name == "llama":
        env["LLAMA_SERVER_ARGS"] = " ".join(extra)
        extra = []
    server = Server(name, prefix + cmd + extra, env=env)
    server.port = port
    return Target(name, server.url, None, server)


def _cpu_list(spec: str) -> list[int]:
    cpus: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


async def run(args) -> dict:
    from tokenfactory.model.default import default_model_path
    gguf = Path(args.model) if args.model else default_model_path()
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    targets = [make_target(n, args, gguf) for n in names]
    started: list[Target] = []
    try:
        for t in targets:   # one at a time: a loading server must not slow the other's start
            if t.server is not None:
                print(f"[ttft] starting {t.name}: {shlex.join(t.server.command)}", flush=True)
                t.server.start()
                t.pid = t.server.proc.pid
                started.append(t)
        async with httpx.AsyncClient(timeout=120.0, trust_env=False,
                                     headers={"authorization": "Bearer bench"}) as client:
            models = {}
            for t in targets:
                r = await client.get(t.url + "/v1/models")
                r.raise_for_status()
                models[t.name] = r.json()["data"][0]["id"]
            for w in range(args.warmup):
                for t in targets:
                    await one_request(client, t, models[t.name], 10_000 + w, args.max_tokens)
            recs: dict[str, list[Record]] = {t.name: [] for t in targets}
            loads = []
            for i in range(args.requests):
                loads.append(os.getloadavg()[0])
                order = targets if i % 2 == 0 else targets[::-1]
                for t in order:
                    for rec in await one_round(client, t, models[t.name], i, args):
                        if t.name.startswith("ours") and rec.ok:
                            await fetch_stages(client, t, rec)
                        recs[t.name].append(rec)
                        if not rec.ok:
                            print(f"[ttft] {t.name} round {i}: {rec.error}", flush=True)
    finally:
        for t in started:
            t.server.stop()
    summary = {name: summarize(rs) for name, rs in recs.items()}
    prompts = {name: [r.prompt_tokens for r in rs] for name, rs in recs.items()}
    same = len({tuple(p) for p in prompts.values()}) == 1
    doc = {"model": str(gguf), "cpus": args.cpus or f"all ({os.cpu_count()})",
           "max_tokens": args.max_tokens, "rounds": args.requests,
           "concurrency": args.concurrency,
           "load_avg_1m": {"min": min(loads), "max": max(loads)} if loads else None,
           "same_prompt_tokens": same, "summary": summary,
           "records": {name: [asdict(r) for r in rs] for name, rs in recs.items()}}
    if len(names) >= 2:
        a, b = summary[names[0]], summary[names[1]]
        doc["ratio"] = {k: (round(a[k] / b[k], 3) if a.get(k) and b.get(k) else None)
                        for k in ("ttft_p50_ms", "itl_p50_ms", "cpu_first_ms", "cpu_request_ms")}
    return doc


def report(doc: dict) -> str:
    names = list(doc["summary"])
    cols = ("ok", "prompt_tokens", "cached_tokens", "ttft_p50_ms", "ttft_p90_ms", "itl_p50_ms",
            "itl_p90_ms", "cpu_first_ms", "cpu_request_ms", "cpu_main_thread_ms")
    lines = [f"model {doc['model']}, cpus {doc['cpus']}, {doc['rounds']} rounds of "
             f"{doc['concurrency']} request(s), max_tokens "
             f"{doc['max_tokens']}, load {doc['load_avg_1m']}, same prompt tokens: "
             f"{doc['same_prompt_tokens']}", "",
             "| target | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for n in names:
        s = doc["summary"][n]
        lines.append(f"| {n} | " + " | ".join(str(s.get(c)) for c in cols) + " |")
    if doc.get("ratio"):
        lines += ["", f"ratio {names[0]} / {names[1]}: " + ", ".join(
            f"{k} {v}" for k, v in doc["ratio"].items())]
    for n in names:
        st = doc["summary"][n].get("stages_p50")
        if st:
            lines += ["", f"{n}: server stages, median over requests (ms; self time unless "
                          "named otherwise)", "| stage | ms |", "|---|---|"]
            for k, v in st.items():
                shown = v if k in ("prefill_chunks", "decode_steps") else _ms(v)
                lines.append(f"| {k} | {shown} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="GGUF file (default: the default model's, Q4_1)")
    p.add_argument("--requests", type=int, default=20, help="rounds (one request per target)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=1,
                   help="requests sent at once per round and target (llama-server gets as "
                        "many slots)")
    p.add_argument("--targets", default="ours,llama",
                   help="comma list of ours, llama, ours-b (the ratio is first / second)")
    p.add_argument("--cpus", default=None, help="taskset -c list for every server, e.g. 1")
    p.add_argument("--ours-args", default="", help="extra `tokenfactory serve` arguments")
    p.add_argument("--ours-src", default=None, help="src/ of the tree to serve as ours "
                   "(default: this checkout's)")
    p.add_argument("--ours-b-src", default=None, help="src/ of another tree for ours-b")
    p.add_argument("--ours-b-args", default="", help="extra serve arguments for ours-b")
    p.add_argument("--llama-args", default="", help="extra llama-server arguments")
    p.add_argument("--ours-url", help="measure a running server instead of starting one")
    p.add_argument("--ours-pid", type=int, help="its pid (for CPU time)")
    p.add_argument("--llama-url", help="measure a running llama-server instead")
    p.add_argument("--llama-pid", type=int, help="its pid (for CPU time)")
    p.add_argument("--json", help="write the summary and every record here")
    args = p.parse_args()
    doc = asyncio.run(run(args))
    print(report(doc))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0 if all(s["ok"] == s["requests"] for s in doc["summary"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
