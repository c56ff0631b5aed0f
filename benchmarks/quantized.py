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

Usage: ``.venv/bin/python benchmarks/quantized.py --repeats 3 [--json out.json]``
(``--gguf FILE`` for another file, e.g. a Q8_0 one made by ``llama-quantize --allow-requantize``).

``--servers`` measures whole servers instead, all started at once and measured in turn each
repeat (interleaved A/B, one client process): ``ours-gguf`` (``tokenfactory serve
--quantization gguf``), ``ours-none`` (dequantized to bf16 at load) and ``llama`` (llama.cpp's
``llama-server`` on the same file via benchmarks/peers/run_llama_server.sh, all cores). Per
server and repeat: batch-1 decode tok/s (256 streamed tokens), prefill tok/s of 512 and 2,048
uncached prompt tokens (benchmarks/real_model_peer.py's measurements, reused), and the time to
first token of a streamed chat request of ~60 prompt tokens (``--ttft-requests`` of them,
each a different question, median). ``llama-bench`` numbers (the same model outside a server:
``-p 512,2048 -n 128``) are printed too when the binary exists, and with ``--chat-requests 64``
chat at concurrency 16 (``tokenfactory bench --workload chat``, 128 output tokens each)::

    .venv/bin/python benchmarks/quantized.py --servers ours-gguf,ours-none,llama --repeats 3 \
        --chat-requests 64 --llama-bench

``--engine`` measures whole ``EngineCore`` steps (scheduler, executor, sampler, detokenizer;
no HTTP) for both quantizations instead. Keep it short on a shared host and say so when
quoting numbers (this 2-core machine is shared); there, ``OMP_NUM_THREADS=1 taskset -c 1 ...
--clock cpu`` counts CPU seconds of one thread instead of wall time.

Measured 2026-11-29 20:05-20:30 UTC (GEMM kernel on packed blocks at every row count),
SmolLM2-135M Q4_1, AMD EPYC Zen 4 (2 cores, AVX-512 VNNI + BF16), host shared by 6 sessions
(load average 9-12): ``OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python
benchmarks/quantized.py --repeats 3 --decode-steps 24 --clock cpu --prefill-2048
--llama-cpu``, medians, one thread, CPU time:

    linear weights read per token   Q4_1+Q8_0 96.4 MB   bf16 269.0 MB
    all linears once, batch 1       5.4 ms (17.8 GB/s)  13.0 ms (20.6 GB/s; host read 23.6)
    decode b1, native decode step   219 tok/s           105 tok/s    (2.08x; llama.cpp 93)
    prefill 512 / 2,048             921 / 716 tok/s     693 / 586    (llama.cpp 172 / 139)
    TTFT compute, 60 tokens         86.7 ms             127 ms       (llama.cpp 336)

docs/quantization.md has the Q8_0 rows, the engine-level figures and the commands.
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


GROUPS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")


def linear_groups(model) -> dict[str, list[torch.nn.Module]]:
    """The linears by kind: each projection over all layers, and the lm_head."""
    groups = {g: [getattr(layer.self_attn if g in ("qkv_proj", "o_proj") else layer.mlp, g)
                  for layer in model.layers] for g in GROUPS[:-1]}
    return {**groups, "lm_head": [model.lm_head]}


def time_linears(model, iters: int, mods=None) -> float:
    """Seconds for one pass over every linear (or ``mods``) at batch 1."""
    mods = mods if mods is not None else linears(model)
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


def llama_cpu(gguf: str, repeats: int, prefill_sizes: list[int], ttft_tokens: int) -> dict:
    """llama.cpp on one thread, in CPU seconds (a shared host's fair clock, as ``--clock cpu``
    is for ours): llama-bench runs as a child process and the children's CPU time is
    read around each run; a run with a 1-token prompt and nothing generated (model load,
    graph setup) is subtracted. Returns tok/s for batch-1 decode (128 tokens), each prefill
    size, and the CPU ms of a ``ttft_tokens`` prompt plus one generated token."""
    import resource
    import subprocess
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from real_model_peer import llama_binary
    binary = llama_binary("llama-bench")
    if not binary.exists():
        return {"error": f"no {binary}"}

    def cpu(p: int, n: int) -> float:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([str(binary), "-m", gguf, "-p", str(p), "-n", str(n), "-r", str(repeats),
                        "-t", "1", "--no-warmup", "-o", "json"], check=True,
                       capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    base = cpu(1, 0)
    out = {"decode_tok_s": repeats * 128 / (cpu(0, 128) - base)}
    for n in prefill_sizes:
        out[f"prefill_{n}_tok_s"] = repeats * n / (cpu(n, 0) - base)
    # -p N -n 1 runs the prompt and the generation as separate tests: add their parts
    t_prompt = (cpu(ttft_tokens, 0) - base) / repeats
    t_token = 1.0 / out["decode_tok_s"]
    out["ttft_cpu_ms"] = (t_prompt + t_token) * 1e3
    return out


def time_ttft(model, n: int) -> float:
    """Seconds of a ``n``-token prefill plus one decode step (torch forward): the compute in
    a short chat request's time to first token, without the server around it."""
    pages = (n + 8) // BS + 2
    bind_cache(model, pages)
    ids = torch.randint(0, 40000, (n,), generator=torch.Generator().manual_seed(1))
    table = torch.arange(pages)
    with torch.no_grad():
        t = CLOCK()
        meta = AttentionMetadata(block_size=BS, slot_mapping=torch.arange(n),
                                 prefills=[PrefillSeq(0, n, 0, table)])
        h = model(ids, torch.arange(n), meta)
        model.compute_logits(h[-1:])
        pos = torch.tensor([n])
        meta = AttentionMetadata(block_size=BS, slot_mapping=pos, num_decodes=1,
                                 decode_groups=[DecodeGroup(0, 1, table[None], pos)])
        model.compute_logits(model(torch.tensor([5]), pos, meta))
    return CLOCK() - t


def run_engines(args) -> int:
    """The ``--engine`` mode: whole engine steps (EngineCore.step: scheduler, executor,
    sampler, detokenizer) for ``gguf`` and ``none`` on the same file, interleaved per repeat:
    a 60-token prompt's first step (its time to first token without HTTP), a 512-token
    prompt's prefill step, and the median batch-1 decode step of a 40-token generation."""
    from tokenfactory.engine.llm import build_engine_core
    from tokenfactory.engine.sampling_params import SamplingParams
    path = args.gguf or default_model_path()
    engines = {q: build_engine_core(path, quantization=q, num_kv_blocks=600, kernels=None)
               for q in ("gguf", "none")}
    ids = iter(range(1 << 30))

    def step_times(core, prompt: list[int], max_tokens: int) -> list[float]:
        core.reset_prefix_cache()
        core.add_request(f"q{next(ids)}", prompt, SamplingParams(temperature=0, ignore_eos=True,
                                                                max_tokens=max_tokens))
        times = []
        while core.has_unfinished_requests():
            t = CLOCK()
            core.step()
            times.append(CLOCK() - t)
        return times

    gen = torch.Generator().manual_seed(0)
    res = {q: {"ttft_60_ms": [], "prefill_512_tok_s": [], "decode_tok_s": []} for q in engines}
    for _ in range(args.repeats):
        for q, core in engines.items():   # interleaved A/B
            p60 = torch.randint(100, 40000, (60,), generator=gen).tolist()
            p512 = torch.randint(100, 40000, (512,), generator=gen).tolist()
            res[q]["ttft_60_ms"].append(step_times(core, p60, 1)[0] * 1e3)
            res[q]["prefill_512_tok_s"].append(512 / step_times(core, p512, 1)[0])
            res[q]["decode_tok_s"].append(1 / statistics.median(step_times(core, p60, 40)[5:]))
    out = {"gguf": str(path), "clock": args.clock, "threads": torch.get_num_threads(),
           "engines": {q: {k: statistics.median(v) for k, v in r.items()} for q, r in res.items()},
           "load_average": os.getloadavg()}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def read_bandwidth() -> float:
    """GB/s of a plain read (sum) of 256 MB: the host's streaming bandwidth, roughly."""
    buf = torch.ones(64 << 20, dtype=torch.float32)
    buf.sum()
    t = CLOCK()
    for _ in range(5):
        buf.sum()
    return 5 * buf.numel() * 4 / (CLOCK() - t) / 1e9


# ------------------------------------------------------------------------- whole servers

QUESTIONS = ["What is the capital of France", "How do plants make food from sunlight",
             "Why is the sky blue during the day", "What causes the seasons on Earth",
             "How does a refrigerator keep food cold", "What is the difference between a virus "
             "and a bacterium", "Why do cats purr", "How do airplanes stay in the air"]


async def chat_ttft(c, url: str, model: str, question: str) -> dict:
    """Seconds to the first streamed content token of a short chat request (~60 prompt
    tokens with SmolLM2's template and its default system turn)."""
    body = {"model": model, "max_tokens": 8, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": question + "? Please answer in one "
                          "short sentence, in plain English, without any lists or headings."}]}
    t0 = time.perf_counter()
    first, usage = None, {}
    async with c.stream("POST", url + "/v1/chat/completions", json=body,
                        headers={"authorization": "Bearer bench"}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"chat: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            obj = json.loads(line[5:])
            usage = obj.get("usage") or usage
            if first is None and any((ch.get("delta") or {}).get("content")
                                     for ch in obj.get("choices") or []):
                first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError("chat: no content streamed")
    return {"ttft_s": first, "prompt_tokens": usage.get("prompt_tokens")}


def llama_bench(gguf: str, threads: int) -> dict | None:
    """llama.cpp's llama-bench on the file (pp512, pp2048, tg128, one repetition each): its
    own view of the same model without a server, or None if not built."""
    import subprocess
    from real_model_peer import llama_binary
    binary = llama_binary("llama-bench")
    if not binary.exists():
        return None
    proc = subprocess.run([str(binary), "-m", gguf, "-p", "512,2048", "-n", "128", "-r", "1",
                           "-t", str(threads), "-o", "json"], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-300:]}
    return {("tg" if r["n_gen"] else "pp") + str(r["n_gen"] or r["n_prompt"]): r["avg_ts"]
            for r in json.loads(proc.stdout)}


def chat_concurrency(url: str, model: str, requests: int, concurrency: int = 16,
                     output_tokens: int = 128) -> dict:
    """``tokenfactory bench --workload chat`` against a running server (OpenAI API): all
    ``requests`` at once, at most ``concurrency`` in flight, ``output_tokens`` each (ignore_eos).
    Returns its output tok/s, TTFT / ITL medians and request counts."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path
    out = Path(tempfile.mkdtemp(prefix="tf-chat-")) / "chat.json"
    cmd = [str(Path(sys.executable).parent / "tokenfactory"), "bench", "--workload", "chat",
           "--target", url, "--api", "openai", "--model-name", model, "--requests", str(requests),
           "--rate", "0", "--concurrency", str(concurrency), "--output-tokens", str(output_tokens),
           "--no-roofline", "--no-progress", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        return {"error": proc.stderr.strip()[-300:]}
    m = json.loads(out.read_text())["runs"][0]["metrics"]
    return {k: m.get(k) for k in ("output_throughput_tps", "ttft_p50_s", "itl_p50_s",
                                  "completed_requests", "failed_requests", "duration_s")}


def run_servers(args) -> int:
    """The ``--servers`` mode (see the module docstring)."""
    import asyncio
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    import httpx
    import real_model_peer as peer
    gguf = Path(args.gguf or default_model_path())
    ours = [str(Path(sys.executable).parent / "tokenfactory"), "serve", "--model", str(gguf),
            "--host", "127.0.0.1"]
    threads = args.threads or os.cpu_count()   # both sides the same number of cores
    ours_env = {"OMP_NUM_THREADS": str(threads)} if args.threads else {}
    # --threads: every server pinned to the first `threads` cores (ours sizes its thread pool
    # from the cores it may run on; llama.cpp takes -t)
    pin = ["taskset", "-c", f"0-{threads - 1}"] if args.threads else []
    servers = {}
    for name in args.servers.split(","):
        port = peer.free_port()
        if name in ("ours-gguf", "ours-none"):
            cmd = pin + ours + ["--port", str(port), "--quantization", name.removeprefix("ours-")]
            server = peer.Server(name, cmd, env=ours_env)
        elif name == "llama":
            # 16 slots: chat at concurrency 16 runs 16 sequences at once on both sides
            server = peer.Server(name, pin + [str(peer.PEERS / "run_llama_server.sh"), str(gguf),
                                              str(port), "16", "2560"], env={"THREADS": str(threads)})
        else:
            raise SystemExit(f"unknown server {name!r} (ours-gguf, ours-none, llama)")
        server.port = port
        servers[name] = server
    ids = peer.prompt_ids(gguf, 2100)
    sizes = args.prefill_sizes
    heads = peer.distinct_heads(ids, len(servers) * (args.repeats * (len(sizes) + 1) + 1))
    res = {name: {"decode_tok_s": [], "ttft_s": [], **{f"prefill_{n}_tok_s": [] for n in sizes}}
           for name in servers}
    head = iter(heads)

    async def measure() -> None:
        timeout = httpx.Timeout(600.0, connect=10.0)
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as c:
            models = {n: await peer.model_name(c, s.url) for n, s in servers.items()}
            for n, s in servers.items():   # warm-up: thread pools, graphs, the system turn
                await peer.prefill(c, s.url, models[n], [next(head)] + ids[1000:1015])
                await chat_ttft(c, s.url, models[n], "Hello")
            for rep in range(args.repeats):
                for n, s in servers.items():                     # interleaved A/B
                    r = res[n]
                    d = await peer.decode_b1(c, s.url, models[n], [next(head)] + ids[:31], 256)
                    r["decode_tok_s"].append(d["decode_tok_s"])
                    for size in sizes:
                        p = await peer.prefill(c, s.url, models[n], [next(head)] + ids[1:size])
                        r[f"prefill_{size}_tok_s"].append(p["prefill_tok_s"])
                    for q in range(args.ttft_requests):
                        question = QUESTIONS[(rep * args.ttft_requests + q) % len(QUESTIONS)]
                        t = await chat_ttft(c, s.url, models[n], question)
                        r["ttft_s"].append(t["ttft_s"])
                        r["ttft_prompt_tokens"] = t["prompt_tokens"]
                    print(f"  {n} repeat {rep + 1}: decode {r['decode_tok_s'][-1]:.1f} tok/s, "
                          f"prefill {[round(r[f'prefill_{n}_tok_s'][-1]) for n in sizes]}, ttft "
                          f"{statistics.median(r['ttft_s'][-args.ttft_requests:]) * 1e3:.0f} ms "
                          f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr)

    async def model_names() -> dict[str, str]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(60.0), trust_env=False) as c:
            return {n: await peer.model_name(c, s.url) for n, s in servers.items()}

    try:
        for s in servers.values():
            s.start()
        asyncio.run(measure())
        if args.chat_requests:   # one run per server, in turn (each takes the whole host)
            names = asyncio.run(model_names())
            for n, s in servers.items():
                res[n]["chat16"] = chat_concurrency(s.url, names[n], args.chat_requests)
                print(f"  {n} chat at concurrency 16: {res[n]['chat16']}", file=sys.stderr)
    finally:
        for s in servers.values():
            s.stop()
    out = {"gguf": str(gguf), "threads": threads, "load_average": os.getloadavg(), "servers": {}}
    for n, r in res.items():
        out["servers"][n] = {k: statistics.median(v) for k, v in r.items() if isinstance(v, list)}
        if "chat16" in r:
            out["servers"][n]["chat16"] = r["chat16"]
        out["servers"][n]["raw"] = r
    if args.llama_bench:
        out["llama_bench"] = llama_bench(str(gguf), threads)
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--servers", help="comma list of ours-gguf, ours-none, llama: measure "
                                      "servers instead (see the module docstring)")
    ap.add_argument("--prefill-sizes", type=lambda v: [int(x) for x in v.split(",")],
                    default=[512, 2048], help="--servers: prompt sizes")
    ap.add_argument("--ttft-requests", type=int, default=3, help="--servers: chat requests a repeat")
    ap.add_argument("--llama-bench", action="store_true", help="--servers: also run llama-bench")
    ap.add_argument("--chat-requests", type=int, default=0,
                    help="--servers: also chat at concurrency 16 with this many requests (64: "
                         "issue 20's figure; 128 output tokens each), one run per server")
    ap.add_argument("--threads", type=int, default=0,
                    help="--servers: threads for every server (default: all cores). On a shared "
                         "host 1 each: llama.cpp's thread pool stalls at every barrier when a "
                         "core is taken (benchmarks/peers/README.md)")
    ap.add_argument("--engine", action="store_true",
                    help="whole engine steps instead (gguf vs none: TTFT 60, prefill 512, decode "
                         "b1); one thread: run under `taskset -c N` (the engine uses every core "
                         "it may run on)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--prefill-2048", action="store_true", help="also a 2,048-token prefill")
    ap.add_argument("--ttft-tokens", type=int, default=60,
                    help="prompt tokens of the short-request TTFT compute (prefill + 1 step)")
    ap.add_argument("--llama-cpu", action="store_true",
                    help="also llama-bench on the same file, one thread, in CPU seconds")
    ap.add_argument("--force-native", action="store_true",
                    help="QuantLinear's native kernel for every row count")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: process CPU seconds instead of wall time; with "
                         "OMP_NUM_THREADS=1 a proxy for work done on a host others share")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.servers:
        return run_servers(args)
    global CLOCK
    if args.clock == "cpu":
        CLOCK = time.process_time
    if args.engine:
        return run_engines(args)
    path = args.gguf or default_model_path()
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
                                                  "native_decode_tok_s": [], "prefill_tok_s": [],
                                                  "prefill_2048_tok_s": [], "ttft_ms": []}
                                              for k in models}
    bandwidth = []
    for _ in range(args.repeats):
        bandwidth.append(read_bandwidth())
        for name, model in models.items():   # interleaved A/B
            res[name]["linears_ms"].append(time_linears(model, 10) * 1e3)
            for g, mods in linear_groups(model).items():
                res[name].setdefault(f"{g}_ms", []).append(time_linears(model, 10, mods) * 1e3)
            res[name]["decode_tok_s"].append(time_decode(model, args.decode_steps))
            res[name]["native_decode_tok_s"].append(time_native_decode(model, args.decode_steps))
            res[name]["prefill_tok_s"].append(time_prefill(model, args.prefill))
            if args.prefill_2048:
                res[name]["prefill_2048_tok_s"].append(time_prefill(model, 2048))
            res[name]["ttft_ms"].append(time_ttft(model, args.ttft_tokens) * 1e3)
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
            "prefill_2048_tok_s": (statistics.median(res[name]["prefill_2048_tok_s"])
                                   if res[name]["prefill_2048_tok_s"] else None),
            "ttft_ms": statistics.median(res[name]["ttft_ms"]),
            "by_kind": {g: {"ms": statistics.median(res[name][f"{g}_ms"]),
                            "MB": weight_bytes(mods) / 1e6,
                            "GB_s": weight_bytes(mods) / statistics.median(res[name][f"{g}_ms"]) / 1e6}
                        for g, mods in linear_groups(model).items()},
            "raw": res[name]}
    if args.llama_cpu:
        out["llama_cpp_one_thread_cpu"] = llama_cpu(
            str(path), args.repeats, [args.prefill] + ([2048] if args.prefill_2048 else []),
            args.ttft_tokens)
    out["load_average"] = os.getloadavg()
    print(json.dumps({k: v for k, v in out.items()}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
