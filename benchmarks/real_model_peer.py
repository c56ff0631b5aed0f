"""The real model, one GGUF file, two servers: tokenfactory against llama.cpp's `llama-server`.

Issue 12, part 4. For each configuration the script starts the server on a free loopback port
(or measures one already running, `--url`), sends one short warm-up request, then measures, per
repeat, against the OpenAI API both servers speak:

  decode      batch-1 decode tok/s: one streamed `/v1/completions` request, greedy, a 32-token
              prompt, `max_tokens` 256 with `ignore_eos`; (completion_tokens - 1) / (last chunk -
              first chunk). Both must report exactly 256 completion tokens, else the run fails.
  prefill N   N = 512 and 2,048: one `/v1/completions` request whose prompt is a list of exactly N
              token ids (real text tokenized by `transformers`' GGUF tokenizer, a reference nobody
              here wrote), `max_tokens` 1, not streamed; N / request latency. The first token
              differs per repeat and per size so no prefix cache can serve any of it (`cache_prompt:
              false` for llama-server too), and `usage.prompt_tokens` must equal N.
  chat c16    64 `/v1/chat/completions` requests from `tokenfactory bench`'s chat workload
              (seed = repeat index, so no repeat finds the last one's prompts cached; 30-200-word
              prompts, 128 output tokens, `ignore_eos`), all handed to the client at once behind
              a client-side semaphore of 16, so each server sees exactly 16 in flight (ours
              would otherwise batch all 64; llama-server has 16 slots). TTFT is measured from
              the moment a request is actually sent (after the semaphore), ITL between streamed
              chunks (one token each on both servers), throughput = output tokens / wall time.

Configurations (`--configs`, run in the given order, each started fresh and stopped after):
  ours         `tokenfactory serve --model FILE.gguf` (weights dequantized to bf16 at load)
  llama-q4_1   `benchmarks/peers/run_llama_server.sh FILE.gguf PORT 16 2560` (the file as is)
  llama-bf16   the same, on a bf16 GGUF of the same weights made by `llama-quantize
               --allow-requantize FILE BF16` (cached under ~/.cache/tokenfactory/gguf/)

    .venv/bin/python benchmarks/real_model_peer.py --repeats 2 \\
        --json benchmarks/results/real_model_peer.json --markdown benchmarks/results/real_model_peer.md
    .venv/bin/python benchmarks/real_model_peer.py --url http://127.0.0.1:8091 --label mine

Both servers use all cores (`-t $(nproc)` for llama-server). On CPUs with AMX the run script
passes `--no-repack` to llama-server (see benchmarks/peers/run_llama_server.sh).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tokenfactory.bench import client as bench_client  # noqa: E402
from tokenfactory.bench.client import RequestRecord  # noqa: E402
from tokenfactory.bench.metrics import itls, percentile  # noqa: E402
from tokenfactory.bench.targets import LOOPBACK, free_port  # noqa: E402
from tokenfactory.bench.workloads import chat as chat_workload  # noqa: E402

CACHE = Path(os.environ.get("TOKENFACTORY_CACHE", Path.home() / ".cache" / "tokenfactory"))
PEERS = ROOT / "benchmarks" / "peers"
CONFIGS = ("ours", "llama-q4_1", "llama-bf16")
SLOTS, CTX_PER_SLOT = 16, 2560           # llama-server: 16 slots of 2,560 tokens (> 2,048 + 1)


# ---------------------------------------------------------------------------- servers

@dataclass
class Server:
    """A server process in its own process group, stopped by signalling that group."""
    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout: float = 300.0
    proc: subprocess.Popen | None = None
    port: int = 0
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.log_path = Path(tempfile.mkdtemp(prefix=f"real-model-{self.name}-")) / "server.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         env={**os.environ, **self.env})
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode} before "
                                   f"/health answered; log {self.log_path}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer /health within {self.startup_timeout:.0f} s; "
                           f"log {self.log_path}:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def llama_binary(name: str) -> Path:
    return CACHE / "llama.cpp" / "bin" / name


def bf16_gguf(src: Path) -> Path:
    """A bf16 GGUF holding `src`'s weights (dequantized by llama.cpp itself), cached."""
    out = CACHE / "gguf" / (src.name.split(".")[0] + ".BF16.gguf")
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    quantize = llama_binary("llama-quantize")
    if not quantize.exists():
        raise RuntimeError(f"no {quantize}: run benchmarks/peers/build_llama_server.sh (it builds llama-quantize too)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    subprocess.run([str(quantize), "--allow-requantize", str(src), str(tmp), "BF16"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp.replace(out)
    return out


def make_server(config: str, gguf: Path) -> tuple[Server, Path]:
    port = free_port()
    if config == "ours":
        server = Server("ours", [str(ROOT / ".venv" / "bin" / "tokenfactory"), "serve", "--model",
                                 str(gguf), "--host", "127.0.0.1", "--port", str(port)])
        model_file = gguf
    else:
        model_file = gguf if config == "llama-q4_1" else bf16_gguf(gguf)
        server = Server(config, [str(PEERS / "run_llama_server.sh"), str(model_file), str(port),
                                 str(SLOTS), str(CTX_PER_SLOT)], env={"THREADS": str(os.cpu_count())})
    server.port = port
    return server, model_file


# ---------------------------------------------------------------------------- prompts

def prompt_ids(gguf: Path, n: int) -> list[int]:
    """At least `n` token ids of real English and Python text (stdlib sources), tokenized by
    `transformers`' own GGUF tokenizer for this file."""
    import textwrap
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    text = Path(textwrap.__file__).read_text() + Path(argparse.__file__).read_text()
    ids = tok(text, add_special_tokens=False).input_ids
    if len(ids) < n:
        raise RuntimeError(f"only {len(ids)} tokens of prompt text, need {n}")
    return ids


def distinct_heads(ids: list[int], count: int) -> list[int]:
    """`count` different token ids to put first, so no two prompts share a prefix."""
    heads, seen = [], set()
    for t in ids:
        if t not in seen:
            seen.add(t)
            heads.append(t)
        if len(heads) == count:
            return heads
    raise RuntimeError("not enough distinct tokens")


# ---------------------------------------------------------------------------- measurements

HEADERS = {"authorization": "Bearer bench"}


async def model_name(c: httpx.AsyncClient, url: str) -> str:
    r = await c.get(url + "/v1/models")
    r.raise_for_status()
    return r.json()["data"][0]["id"]


async def decode_b1(c: httpx.AsyncClient, url: str, model: str, prompt: list[int], n_out: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": n_out, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "min_tokens": n_out, "cache_prompt": False,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times: list[float] = []
    usage: dict = {}
    text: list[str] = []
    async with c.stream("POST", url + "/v1/completions", json=body, headers=HEADERS) as r:
        if r.status_code != 200:
            raise RuntimeError(f"decode: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if obj.get("usage"):
                usage = obj["usage"]
            piece = "".join(ch.get("text") or "" for ch in obj.get("choices") or [])
            if piece:
                times.append(time.perf_counter())
                text.append(piece)
    n = int(usage.get("completion_tokens") or 0)
    if n != n_out:
        raise RuntimeError(f"decode: asked for {n_out} tokens, server reported {n} ({usage})")
    if len(times) < 2:
        raise RuntimeError("decode: fewer than 2 streamed chunks")
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"output_tokens": n, "chunks": len(times), "ttft_s": times[0] - t0,
            "decode_tok_s": (n - 1) / (times[-1] - times[0]),
            "itl_p50_s": percentile(gaps, 50), "itl_p99_s": percentile(gaps, 99),
            "text": "".join(text)}


async def prefill(c: httpx.AsyncClient, url: str, model: str, prompt: list[int]) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0,
            "cache_prompt": False}
    t0 = time.perf_counter()
    r = await c.post(url + "/v1/completions", json=body, headers=HEADERS)
    dt = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"prefill: HTTP {r.status_code}: {r.text[:300]}")
    obj = r.json()
    usage = obj.get("usage") or {}
    p = int(usage.get("prompt_tokens") or 0)
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    cached = cached or int((obj.get("timings") or {}).get("cache_n") or 0)
    if p != len(prompt) or cached:
        raise RuntimeError(f"prefill: sent {len(prompt)} tokens, server reported {p} ({cached} cached)")
    out = {"prompt_tokens": p, "latency_s": dt, "prefill_tok_s": p / dt}
    timings = obj.get("timings")                     # llama-server's own view, for the record
    if timings:
        out["server_prompt_ms"] = timings.get("prompt_ms")
    return out


async def chat_c16(c: httpx.AsyncClient, url: str, model: str, requests: int, concurrency: int,
                   n_out: int, seed: int) -> dict:
    # a new seed per repeat: repeat 2 must not find repeat 1's prompts in either server's cache
    wl = chat_workload(seed=seed, requests=requests, rate=0.0, output_tokens=n_out)
    sem = asyncio.Semaphore(concurrency)
    t0 = time.perf_counter()
    clock = lambda: time.perf_counter() - t0  # noqa: E731
    records: list[RequestRecord] = []

    async def one(session) -> None:
        async with sem:
            rec = RequestRecord(session=session.id, turn=0, t_send=clock())
            records.append(rec)
            body = bench_client.openai_body(model, session, bench_client.neutral_messages(session, 0, []),
                                            n_out)
            await bench_client.send(c, url, "openai", body, rec, clock)

    await asyncio.gather(*(one(s) for s in wl.sessions))
    wall = clock()
    ok = [r for r in records if r.ok]
    short = [r for r in ok if r.output_tokens != n_out]
    if len(ok) != requests or short:
        errs = sorted({r.error or "" for r in records if not r.ok})[:3]
        raise RuntimeError(f"chat: {len(ok)}/{requests} ok, {len(short)} with != {n_out} tokens; {errs}")
    out_tokens = sum(r.output_tokens for r in ok)
    gaps = [g for r in ok for g in itls(r)]
    ttfts = [r.t_first - r.t_send for r in ok]
    return {"seed": seed, "requests": requests, "concurrency": concurrency, "output_tokens": out_tokens,
            "prompt_tokens": sum(r.prompt_tokens for r in ok),
            "cached_tokens": sum(r.cached_tokens for r in ok),
            "chunks_per_request": sum(len(r.chunk_times) for r in ok) / len(ok),
            "wall_s": wall, "throughput_tok_s": out_tokens / wall,
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
            "itl_p50_s": percentile(gaps, 50), "itl_p99_s": percentile(gaps, 99)}


async def measure(url: str, ids: list[int], repeats: int, args) -> list[dict]:
    sizes = args.prefill
    heads = distinct_heads(ids, repeats * (len(sizes) + 1) + 1)
    timeout = httpx.Timeout(args.request_timeout, connect=10.0)
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
    runs = []
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as c:
        model = await model_name(c, url)
        await prefill(c, url, model, [heads[-1]] + ids[1000:1015])           # warm-up
        for rep in range(repeats):
            h = iter(heads[rep * (len(sizes) + 1):(rep + 1) * (len(sizes) + 1)])
            run: dict = {"repeat": rep + 1, "load_before": os.getloadavg()}
            run["decode"] = await decode_b1(c, url, model, [next(h)] + ids[:31], args.decode_tokens)
            run["prefill"] = {str(n): await prefill(c, url, model, [next(h)] + ids[1:n]) for n in sizes}
            run["chat"] = await chat_c16(c, url, model, args.chat_requests, args.concurrency,
                                         args.chat_tokens, seed=rep)
            runs.append(run)
            print(f"  repeat {rep + 1}: decode {run['decode']['decode_tok_s']:.1f} tok/s, prefill "
                  + ", ".join(f"{n}: {v['prefill_tok_s']:.0f}" for n, v in run["prefill"].items())
                  + f" tok/s, chat {run['chat']['throughput_tok_s']:.1f} tok/s", file=sys.stderr)
    return runs


# ---------------------------------------------------------------------------- report

def machine_info() -> dict:
    info = {"nproc": os.cpu_count(), "platform": platform.platform()}
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            key, _, value = line.partition(":")
            if key in ("Model name", "CPU family", "Model"):
                info[key.lower().replace(" ", "_")] = value.strip()
    except OSError:
        pass
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    info["flags"] = sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2", "avx_vnni")))
    server = llama_binary("llama-server")
    if server.exists():
        v = subprocess.run([str(server), "--version"], capture_output=True, text=True)
        info["llama_server_version"] = " / ".join((v.stdout + v.stderr).strip().splitlines())
    return info


def fmt(v, scale=1.0, digits=1) -> str:
    return "–" if v is None else f"{v * scale:,.{digits}f}"


def common_prefix(a: dict, b: dict) -> str:
    """How far two configurations' greedy decode texts agree (repeat 1 of each)."""
    x, y = a["runs"][0]["decode"]["text"], b["runs"][0]["decode"]["text"]
    n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
    return "identical" if x == y else f"same first {n} chars"


def markdown(result: dict) -> str:
    sizes = result["args"]["prefill"]
    head = ["config", "run", "decode b1 tok/s"] + [f"prefill {n} tok/s" for n in sizes] + [
        "chat c16 tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "load"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cfg in result["configs"]:
        for run in cfg.get("runs", []):
            ch = run["chat"]
            row = [cfg["label"], str(run["repeat"]), fmt(run["decode"]["decode_tok_s"])]
            row += [fmt(run["prefill"][str(n)]["prefill_tok_s"], digits=0) for n in sizes]
            row += [fmt(ch["throughput_tok_s"]), fmt(ch["ttft_p50_s"], 1e3, 0), fmt(ch["ttft_p99_s"], 1e3, 0),
                    fmt(ch["itl_p50_s"], 1e3, 1), fmt(ch["itl_p99_s"], 1e3, 1),
                    f"{run['load_before'][0]:.2f}"]
            lines.append("| " + " | ".join(row) + " |")
        if cfg.get("error"):
            lines.append(f"| {cfg['label']} | – | failed: {cfg['error'].splitlines()[0][:120]} |")
    ours = next((c for c in result["configs"] if c["label"] == "ours" and c.get("runs")), None)
    peers = [c for c in result["configs"] if c is not ours and c.get("runs")]
    if ours and peers:                  # greedy decode text: the same model gives the same words
        lines += [""] + [f"Greedy decode text ({len(ours['runs'][0]['decode']['text'])} chars) vs ours: "
                         + ", ".join(f"{c['label']} {common_prefix(ours, c)}" for c in peers) + ". "
                         + "Chat prompt tokens per repeat, of them cached (usage): " + "; ".join(
                             f"{c['label']} " + ", ".join(f"{r['chat']['prompt_tokens']:,} ({r['chat']['cached_tokens']:,})"
                                                         for r in c["runs"]) for c in [ours] + peers) + "."]
    if ours and peers:
        lines += ["", "Ratios ours / llama.cpp (mean of the runs; > 1 = ours higher: better for tok/s, "
                  "worse for latencies):", ""]
        keys = [("decode b1 tok/s", lambda r: r["decode"]["decode_tok_s"])]
        keys += [(f"prefill {n}", lambda r, n=n: r["prefill"][str(n)]["prefill_tok_s"]) for n in sizes]
        keys += [("chat c16 tok/s", lambda r: r["chat"]["throughput_tok_s"]),
                 ("TTFT p50", lambda r: r["chat"]["ttft_p50_s"]), ("TTFT p99", lambda r: r["chat"]["ttft_p99_s"]),
                 ("ITL p50", lambda r: r["chat"]["itl_p50_s"]), ("ITL p99", lambda r: r["chat"]["itl_p99_s"])]
        lines += ["| vs | " + " | ".join(k for k, _ in keys) + " |", "|---|" + "---|" * len(keys)]
        mean = lambda cfg, f: sum(f(r) for r in cfg["runs"]) / len(cfg["runs"])  # noqa: E731
        for cfg in peers:
            lines.append(f"| {cfg['label']} | " + " | ".join(
                f"{mean(ours, f) / mean(cfg, f):.2f}" for _, f in keys) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    from tokenfactory.model.default import default_model_path
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, default=None, help="the GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--url", default=None, help="measure this running loopback server instead")
    ap.add_argument("--label", default="url", help="label for --url")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--prefill", type=lambda s: [int(x) for x in s.split(",")], default=[512, 2048])
    ap.add_argument("--chat-requests", type=int, default=64)
    ap.add_argument("--chat-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--request-timeout", type=float, default=600.0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    args = ap.parse_args()
    gguf = (args.gguf or Path(default_model_path())).resolve()
    ids = prompt_ids(gguf, max(args.prefill))
    result = {"gguf": str(gguf), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "machine": machine_info(), "args": {k: (str(v) if isinstance(v, Path) else v)
                                                  for k, v in vars(args).items()}, "configs": []}
    if args.url:
        if urlparse(args.url).hostname not in LOOPBACK:
            ap.error(f"refusing {args.url}: only loopback servers are measured")
        plan = [(args.label, None, gguf)]
    else:
        plan = []
        for cfg in args.configs.split(","):
            if cfg not in CONFIGS:
                ap.error(f"unknown config {cfg!r}; choose from {', '.join(CONFIGS)}")
            plan.append((cfg, cfg, gguf))
    for label, cfg, model in plan:
        entry: dict = {"label": label}
        result["configs"].append(entry)
        server = None
        try:
            url = args.url
            if cfg is not None:
                server, model_file = make_server(cfg, model)
                entry.update(model_file=str(model_file), command=server.command, env={
                    k: os.environ[k] for k in ("NO_REPACK", "KV_TYPE", "LLAMA_SERVER_ARGS") if k in os.environ})
                print(f"[{label}] starting: {' '.join(server.command)}", file=sys.stderr)
                t = time.perf_counter()
                server.start()
                entry["startup_s"] = time.perf_counter() - t
                url = server.url
            entry["runs"] = asyncio.run(measure(url, ids, args.repeats, args))
        except Exception as exc:  # noqa: BLE001 - one failed configuration is a result, not the end
            entry["error"] = f"{type(exc).__name__}: {exc}"
            print(f"[{label}] failed: {entry['error']}", file=sys.stderr)
        finally:
            if server is not None:
                server.stop()
                entry["log"] = str(server.log_path)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    md = markdown(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(md)
    print(md)
    return 0 if all(c.get("runs") for c in result["configs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
