"""Offline throughput, shaped like nano-vllm's bench.py but sized for a 2-core CPU.

Runs, in one process and on the same random ~100M-parameter Llama-shaped checkpoint and dtype:

1. tokenfactory: 64 sequences, prompt lengths 100-1024, output lengths 100-512 (ignore_eos,
   seed 0), driven through EngineCore with the TorchExecutor (continuous batching, paged KV);
2. transformers: one batched ``generate`` over the same prompts (left-padded; it must run to
   the longest output, so its useful tokens are the same requested outputs);
3. batch-1 decode time per token for both, against the host floor: weight bytes / read
   bandwidth (``tokenfactory.economics.host.measure_bandwidth``, the bandwidth half of
   ``measure_host``), measured in alternation with the decode runs (``--rounds``); the ratio
   to the STREAM copy/add figure is printed too (see ``decode_vs_floor``).

    .venv/bin/python benchmarks/offline_throughput.py             # full run (~5-10 min)
    .venv/bin/python benchmarks/offline_throughput.py --num-seqs 8 --max-input 256 --max-output 64

The checkpoint is ``tokenfactory bench``'s own random 100m model
(``tokenfactory.bench.checkpoint.build_bench_checkpoint("100m", "bfloat16")``), written once to
$TOKENFACTORY_CACHE/bench-models (default ~/.cache/tokenfactory), outside the repository. Loaded in ``--dtype`` (bfloat16 by default).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path

CACHE = Path(os.environ.get("TOKENFACTORY_CACHE", Path.home() / ".cache" / "tokenfactory"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(CACHE / "inductor"))

import torch  # noqa: E402

from tokenfactory.engine.core import EngineConfig, EngineCore  # noqa: E402
from tokenfactory.engine.sampling_params import SamplingParams  # noqa: E402
from tokenfactory.model.runner import TorchExecutor  # noqa: E402

def ensure_model() -> Path:
    """The same random ~95M-parameter Llama that ``tokenfactory bench`` uses (built once)."""
    from tokenfactory.bench.checkpoint import build_bench_checkpoint
    return build_bench_checkpoint("100m", "bfloat16")


def workload(args) -> tuple[list[list[int]], list[int]]:
    gen = random.Random(args.seed)
    vocab = args.vocab_size
    prompts = [[gen.randrange(vocab) for _ in range(gen.randint(args.min_input, args.max_input))]
               for _ in range(args.num_seqs)]
    outputs = [gen.randint(args.min_output, args.max_output) for _ in range(args.num_seqs)]
    return prompts, outputs


def make_engine(ex: TorchExecutor, args, step_hook=None) -> EngineCore:
    return EngineCore(ex, EngineConfig(max_num_seqs=args.num_seqs,
                                       max_num_batched_tokens=args.max_batched_tokens,
                                       kv_cache_memory=int(args.kv_cache_gb * 2**30)),
                      model_max_len=ex.max_model_len, step_hook=step_hook)


def run_ours(ex: TorchExecutor, prompts, outputs, args) -> tuple[float, int]:
    engine = make_engine(ex, args)
    for i, (p, n) in enumerate(zip(prompts, outputs)):
        engine.add_request(f"w{i}", p[:32], SamplingParams(temperature=0.6, max_tokens=8,
                                                           ignore_eos=True, seed=i))
    while engine.has_unfinished_requests():   # warm-up: thread pools, buffers
        engine.step()
    steps: list[tuple[float, int, int]] = []   # (seconds, tokens, sequences) per step
    engine = make_engine(ex, args, lambda dt, toks: steps.append(
        (dt, sum(toks.values()), len(toks))))
    for i, (p, n) in enumerate(zip(prompts, outputs)):
        engine.add_request(str(i), p, SamplingParams(temperature=0.6, max_tokens=n,
                                                     ignore_eos=True))
    produced = 0
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                produced += len(out.outputs[0].token_ids)
    seconds = time.perf_counter() - t0
    decode = [s for s in steps if s[1] == s[2]]
    mixed = [s for s in steps if s[1] != s[2]]
    print(f"  steps with prefill: {len(mixed)}, {sum(s[0] for s in mixed):.1f}s for "
          f"{sum(s[1] for s in mixed)} tokens; decode-only steps: {len(decode)}, "
          f"{sum(s[0] for s in decode):.1f}s for {sum(s[1] for s in decode)} tokens "
          f"(mean batch {sum(s[2] for s in decode) / max(len(decode), 1):.1f})")
    return seconds, produced


def run_hf(model, prompts, outputs) -> float:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(outputs),
                       min_new_tokens=max(outputs), do_sample=True, temperature=0.6, top_k=0,
                       top_p=1.0, pad_token_id=0)
    return time.perf_counter() - t0


class Batch1Decode:
    """Batch-1 decode steps of one greedy request (prompt 128 tokens): ``run()`` returns the
    median step time in ms over ``args.decode_tokens`` new tokens."""

    def __init__(self, ex: TorchExecutor, args):
        self.times: list[float] = []
        self.args = args
        self.count = 0
        self.engine = EngineCore(ex, EngineConfig(max_num_seqs=1,
                                                  kv_cache_memory=int(args.kv_cache_gb * 2**30)),
                                 model_max_len=ex.max_model_len,
                                 step_hook=lambda dt, toks: self.times.append(dt)
                                 if sum(toks.values()) == 1 else None)
        self.run()        # warm-up pass

    def run(self) -> float:
        self.times.clear()
        self.count += 1
        self.engine.add_request(f"b{self.count}", list(range(1, 129)),
                                SamplingParams(temperature=0, max_tokens=self.args.decode_tokens,
                                               ignore_eos=True))
        while self.engine.has_unfinished_requests():
            self.engine.step()
        return statistics.median(self.times) * 1e3


def weight_arrays(ex: TorchExecutor) -> list:
    """numpy views (no copies) of the bytes a decode step reads: every linear weight incl.
    lm_head (the embedding table is read one row a step)."""
    return [module.weight.detach().view(torch.int16).reshape(-1).numpy()
            for module in ex.model.modules() if hasattr(module, "in_features")]


def decode_vs_floor(ex: TorchExecutor, args, read_bytes: int) -> tuple[float, float]:
    """Batch-1 decode against the floor, measured in alternation (the host drifts by tens of
    percent within minutes here), two ways per round:

    - **host floor**: weight bytes / the host's *read* bandwidth on fresh 256 MiB arrays
      (``measure_bandwidth``; a decode step reads weights and writes almost nothing, and here
      a read-only stream tops out below STREAM copy/add, whose ratio is printed too);
    - **in-place floor**: the time to read the model's own weights where they live
      (``read_seconds`` over views of them). On this VM fresh allocations land in memory that
      reads at ~35 or ~60 GB/s, by luck of the draw, and the weights got one draw at load: the
      in-place floor is what this process's decode step can reach.

    Returns (median decode ms, median ratio to the host floor)."""
    from tokenfactory.economics.host import measure_bandwidth, read_seconds
    decode = Batch1Decode(ex, args)
    weights = weight_arrays(ex)
    assert sum(w.nbytes for w in weights) <= read_bytes
    ratios, stream_ratios, inplace_ratios, times = [], [], [], []
    for r in range(args.rounds):
        stream, details = measure_bandwidth(seconds=1.5)
        read = details["read_bytes_per_s"]
        floor_ms = read_bytes / read * 1e3
        inplace_ms = read_seconds(weights, seconds=0.5) * 1e3
        ms = decode.run()
        times.append(ms)
        ratios.append(ms / floor_ms)
        stream_ratios.append(ms / (read_bytes / stream * 1e3))
        inplace_ratios.append(ms / inplace_ms)
        print(f"  round {r + 1}: host read {read / 1e9:.1f} GB/s -> floor {floor_ms:.2f} ms; "
              f"weights read in place {inplace_ms:.2f} ms ({read_bytes / inplace_ms / 1e6:.1f} "
              f"GB/s); decode {ms:.2f} ms/token = {ratios[-1]:.2f}x host floor, "
              f"{inplace_ratios[-1]:.2f}x in place (STREAM copy/add {stream / 1e9:.1f} GB/s -> "
              f"{stream_ratios[-1]:.2f}x)")
    med = statistics.median
    ms, ratio = med(times), med(ratios)
    print(f"tokenfactory batch-1 decode: median {ms:.2f} ms/token = {ratio:.2f}x the host read "
          f"floor (rounds {min(ratios):.2f}-{max(ratios):.2f}x), {med(inplace_ratios):.2f}x "
          f"the in-place floor ({min(inplace_ratios):.2f}-{max(inplace_ratios):.2f}x), "
          f"{med(stream_ratios):.2f}x STREAM copy/add ({min(stream_ratios):.2f}-"
          f"{max(stream_ratios):.2f}x)")
    return ms, ratio


def chat_latency(ex: TorchExecutor, args) -> None:
    """Batch-1 latency of a short chat request (``--chat-latency``): the first token of a
    60-token prompt (one prefill step + sampling, prefix cache off) and the median step time
    of the 64 decode steps after it, over ``--rounds`` requests; median and best round."""
    times: list[float] = []
    engine = EngineCore(ex, EngineConfig(max_num_seqs=1, enable_prefix_caching=False,
                                         kv_cache_memory=int(args.kv_cache_gb * 2**30)),
                        model_max_len=ex.max_model_len,
                        step_hook=lambda dt, toks: times.append(dt))
    prompt = [1 + (i * 37) % (args.vocab_size - 1) for i in range(60)]

    def one(n: int) -> tuple[float, float]:
        times.clear()
        engine.add_request(f"c{time.perf_counter()}", prompt,
                           SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
        return times[0] * 1e3, statistics.median(times[1:]) * 1e3

    one(8)   # warm-up: buffers, thread pool
    first, itl = zip(*(one(65) for _ in range(args.rounds)))
    med = statistics.median
    info = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                  if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines()
                  if line.startswith("flags")), [])
    flags = " ".join(sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2"))))
    print(f"cpu: {model!r} ({flags}), {torch.get_num_threads()} threads")
    if hasattr(ex, "kernel_choice"):
        print(ex.kernel_choice.summary())
    print(f"chat latency over {args.rounds} requests: first token of a 60-token prompt median "
          f"{med(first):.1f} ms (best {min(first):.1f}); batch-1 inter-token median "
          f"{med(itl):.2f} ms (best round {min(itl):.2f})")


def decode_ms_hf(model, args) -> float:
    ids = torch.arange(1, 129)[None]
    n = args.decode_tokens
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        total = time.perf_counter() - t0
    return (total - prefill) / (n - 1) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-seqs", type=int, default=64)
    ap.add_argument("--min-input", type=int, default=100)
    ap.add_argument("--max-input", type=int, default=1024)
    ap.add_argument("--min-output", type=int, default=100)
    ap.add_argument("--max-output", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-batched-tokens", type=int, default=2048)
    ap.add_argument("--kv-cache-gb", type=float, default=1.5)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5,
                    help="alternating host-bandwidth / batch-1 decode measurements")
    ap.add_argument("--skip-hf", action="store_true", help="only run tokenfactory")
    ap.add_argument("--decode-only", action="store_true",
                    help="only the host floor and tokenfactory's batch-1 decode (~2 min)")
    ap.add_argument("--model", default=None,
                    help="a GGUF file or model directory instead of the bench's random 100m "
                         "model ('default': SmolLM2-135M-Instruct)")
    ap.add_argument("--kernels", choices=["auto", "native", "torch", "fixed"], default="auto",
                    help="kernel choice (model/kernel_choice.py); fixed: the rule before it")
    ap.add_argument("--chat-latency", action="store_true",
                    help="only batch-1 first-token time of a 60-token prompt and inter-token "
                         "latency, --rounds requests")
    args = ap.parse_args()
    args.min_input = min(args.min_input, args.max_input)
    args.min_output = min(args.min_output, args.max_output)

    if args.model == "default":
        from tokenfactory.model.default import default_model_path
        model_dir = default_model_path()
    else:
        model_dir = Path(args.model) if args.model else ensure_model()
    # "fixed" passes nothing, so older trees (before kernel_choice) run the same command
    kernel_arg = {} if args.kernels == "fixed" else {"kernels": args.kernels}
    ex = TorchExecutor(model_dir, dtype=args.dtype, **kernel_arg)
    dtype, cfg = ex.dtype, ex.model_config
    args.vocab_size = cfg.vocab_size
    # Bytes a decode step must read: every weight incl. lm_head, but only one row of an untied
    # embedding table (the stricter floor).
    untied_embedding = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    read_bytes = (cfg.num_params() - untied_embedding) * dtype.itemsize
    print(f"model: {cfg.num_params() / 1e6:.1f}M params, {dtype}, {torch.get_num_threads()} "
          f"threads, weights read per decode step {read_bytes / 1e6:.0f} MB")

    if args.chat_latency:
        chat_latency(ex, args)
        return
    prompts, outputs = workload(args)
    print(f"workload: {args.num_seqs} seqs, prompt {args.min_input}-{args.max_input} "
          f"(total {sum(map(len, prompts))}), output {args.min_output}-{args.max_output} "
          f"(total {sum(outputs)}), seed {args.seed}")

    ours_ms, ours_ratio = decode_vs_floor(ex, args, read_bytes)
    if args.decode_only:
        return

    seconds, produced = run_ours(ex, prompts, outputs, args)
    ours_tps = produced / seconds
    print(f"tokenfactory: {produced} tokens in {seconds:.1f}s = {ours_tps:.1f} tok/s")
    del ex

    if args.skip_hf:
        return
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    from tokenfactory.economics.host import measure_bandwidth
    read = measure_bandwidth(seconds=1.5)[1]["read_bytes_per_s"]
    floor_ms = read_bytes / read * 1e3
    hf_ms = decode_ms_hf(hf, args)
    print(f"transformers batch-1 decode: {hf_ms:.2f} ms/token = {hf_ms / floor_ms:.2f}x the read "
          f"floor (read {read / 1e9:.1f} GB/s just before)")
    hf_seconds = run_hf(hf, prompts, outputs)
    hf_tps = sum(outputs) / hf_seconds
    print(f"transformers generate: {sum(outputs)} requested tokens "
          f"({len(prompts) * max(outputs)} computed) in {hf_seconds:.1f}s = {hf_tps:.1f} tok/s")
    print(f"ratio: tokenfactory / transformers throughput = {ours_tps / hf_tps:.2f}x; "
          f"batch-1 decode {ours_ratio:.2f}x floor (transformers {hf_ms / floor_ms:.2f}x)")


if __name__ == "__main__":
    main()
