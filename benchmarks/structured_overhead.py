"""Inter-token latency with a JSON-schema constraint vs without, on the real default model.

    nice -n 10 .venv/bin/python benchmarks/structured_overhead.py [--dtype bfloat16]
        [--batches 1 16] [--tokens 64] [--rounds 5] [--profile]

Issue 19 asks for "ITL with constraints <= 1.1x without, at batch 1 and batch 16". For each batch
size B: B identical chat prompts, greedy, generated once unconstrained (A) and once constrained
to ``SCHEMA`` (B), in alternating rounds (A B A B ...) so that load changes on a shared machine
hit both alike. Like is compared with like: ``ignore_eos`` in both (``max_tokens = --tokens``),
and the schema's last field is a string of at least ``MIN_NOTES`` characters, so the JSON value
cannot complete within the run and every constrained row decodes exactly ``--tokens`` tokens
with the grammar working on every step (the script checks it). Not ``min_tokens``: it sends
every row of the batch through the sampler's per-row penalty path (a logits copy and a
non-finite check), which would add the same cost to both sides and flatter the ratio.

How ITL is measured, without touching the engine: a step listener
(``EngineCore.add_step_listener``) timestamps the end of every forward pass; the ITL of a run is
the median gap between consecutive decode steps (every row one token), which covers everything
the engine does between two tokens: scheduling, filling the grammar masks, the forward pass with
the masked sampling, and advancing the matchers. The listener also reports each step's own
duration (masks + forward + sampling); the gap minus the step is the time outside the forward
pass (scheduling and matcher updates). The process CPU time between decode steps (all threads)
is reported too: on a busy host a step's wall time is mostly waiting for a core, while its CPU
time still says how much work it was. Per batch size the table gives the median over rounds of
each, and the ratio constrained / unconstrained.

``--engines`` instead compares xgrammar and llguidance alone (no model): tokenizer setup,
schema compile time and per-step mask time at batch 1 and 16 (needs both installed; the
measurements behind docs/engine.md's choice of llguidance).

``--profile`` then runs one constrained batch under cProfile and prints where the per-step time
of the structured-output machinery goes (llguidance calls, mask application, matcher updates).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import time
from dataclasses import dataclass, field

from tokenfactory import LLM, SamplingParams
from tokenfactory.engine.sampling_params import StructuredOutput
from tokenfactory.model.default import default_model_path

MIN_NOTES = 4000   # characters: more than --tokens tokens can spell, so the value never closes
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]},
             "maxItems": 3},
    "notes": {"type": "string", "minLength": MIN_NOTES}},
    "required": ["name", "age", "tags", "notes"], "additionalProperties": False}
# --engines walks a valid instance of this one (the old benchmark's schema, docs/engine.md)
ENGINES_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}},
    "notes": {"type": "string"}},
    "required": ["name", "age", "tags", "notes"], "additionalProperties": False}
PROMPT = ("Describe a person as JSON with a name, an age, some colour tags and long notes "
          "about their day.")


@dataclass
class StepClock:
    """Step listener: the end time (wall and process CPU) and the duration of every forward
    pass, and how many tokens each request processed in it."""
    ends: list[float] = field(default_factory=list)
    cpu_ends: list[float] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)
    tokens: list[dict[str, int]] = field(default_factory=list)

    def __call__(self, seconds: float, done: dict[str, int]) -> None:
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
        self.durations.append(seconds)
        self.tokens.append(dict(done))

    def clear(self) -> None:
        self.ends.clear()
        self.cpu_ends.clear()
        self.durations.clear()
        self.tokens.clear()

    def decode_steps(self, batch: int) -> list[int]:
        """Indices of steps in which exactly ``batch`` requests each decoded one token and
        the previous step was also such a step (so the gap before it is a pure decode gap)."""
        pure = [len(t) == batch and all(n == 1 for n in t.values()) for t in self.tokens]
        return [i for i in range(1, len(pure)) if pure[i] and pure[i - 1]]


@dataclass
class RunResult:
    itl: float          # median gap between consecutive decode steps, seconds
    step: float         # median duration of those steps (masks + forward + sampling)
    cpu: float          # median process CPU seconds (all threads) between decode steps
    lengths: list[int]  # generated tokens per row


def run(llm: LLM, clock: StepClock, prompt: str, batch: int, tokens: int,
        spec: StructuredOutput | None) -> RunResult:
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True,
                            structured_output=spec)
    clock.clear()
    outs = llm.generate([prompt] * batch, params, use_tqdm=False)
    for o in outs:
        if o.error:
            raise RuntimeError(f"generation failed: {o.error}")
    steps = clock.decode_steps(batch)
    gaps = [clock.ends[i] - clock.ends[i - 1] for i in steps]
    cpu = [clock.cpu_ends[i] - clock.cpu_ends[i - 1] for i in steps]
    return RunResult(statistics.median(gaps), statistics.median(clock.durations[i] for i in steps),
                     statistics.median(cpu), [len(o.outputs[0].token_ids) for o in outs])


def bench(llm: LLM, clock: StepClock, prompt: str, args) -> None:
    schema = StructuredOutput(json_schema=SCHEMA)
    print(f"{'batch':>5} {'ITL plain':>10} {'ITL json':>10} {'ratio':>6} | {'step plain':>10} "
          f"{'step json':>10} {'ratio':>6} | {'outside plain':>13} {'outside json':>12} | "
          f"{'CPU plain':>9} {'CPU json':>9} {'ratio':>6}")
    for batch in args.batches:
        plain, cons = [], []
        for _ in range(args.rounds):   # alternating: A B A B ...
            plain.append(run(llm, clock, prompt, batch, args.tokens, None))
            cons.append(run(llm, clock, prompt, batch, args.tokens, schema))
        for r in plain + cons:
            if set(r.lengths) != {args.tokens}:
                raise RuntimeError(f"rows decoded {sorted(set(r.lengths))} tokens, "
                                   f"not {args.tokens}: not like with like")

        def med(rs, key):
            return statistics.median(getattr(r, key) for r in rs)
        ip, ic, sp, sc = med(plain, "itl"), med(cons, "itl"), med(plain, "step"), med(cons, "step")
        op = statistics.median(r.itl - r.step for r in plain)
        oc = statistics.median(r.itl - r.step for r in cons)
        cp, cc = med(plain, "cpu"), med(cons, "cpu")
        print(f"{batch:5d} {ip * 1e3:8.2f}ms {ic * 1e3:8.2f}ms {ic / ip:6.3f} | "
              f"{sp * 1e3:8.2f}ms {sc * 1e3:8.2f}ms {sc / sp:6.3f} | "
              f"{op * 1e3:11.2f}ms {oc * 1e3:10.2f}ms | "
              f"{cp * 1e3:7.2f}ms {cc * 1e3:7.2f}ms {cc / cp:6.3f}")
        print("      per round, ITL ratio: " + " ".join(
            f"{c.itl / p.itl:.3f}" for p, c in zip(plain, cons)), flush=True)


# (file suffix, function) -> what it is: the structured-output work of a step, and the step
PROFILED = [
    (("engine/core.py", "step"), "engine step (all of it)"),
    (("model/sampler.py", "__call__"), "sampler (all of it)"),
    (("engine/core.py", "_fill_grammar_masks"), "fill the batch bitmask (llguidance)"),
    (("text/grammar.py", "mask_logits"), "apply the bitmask to the logits"),
    (("text/grammar.py", "accept"), "advance the matchers"),
    (("text/grammar.py", "is_terminated"), "ask the matchers if complete"),
]


def profile(llm: LLM, prompt: str, args) -> None:
    """cProfile one constrained and one unconstrained run at the largest batch and print the
    per-step cumulative time of the functions in ``PROFILED``, then the constrained run's
    top functions by own time. The clock is the engine thread's CPU time: the grammar work runs
    on that thread alone, and CPU time stays meaningful when a busy host keeps the thread
    waiting for a core (wall time then measures the queue, not the work)."""
    batch = max(args.batches)
    print(f"--- cProfile, batch {batch}, {args.tokens} tokens: engine-thread CPU ms per step ---")
    print(f"{'':46s} {'plain':>9} {'json':>9}")
    per_step, profiles = {}, {}
    for name, spec in (("plain", None), ("json", StructuredOutput(json_schema=SCHEMA))):
        params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True,
                                structured_output=spec)
        llm.generate([prompt] * batch, params, use_tqdm=False)   # warm: buffers at this size
        prof = cProfile.Profile(time.thread_time)   # CPU time of this (the engine's) thread
        prof.enable()
        llm.generate([prompt] * batch, params, use_tqdm=False)
        prof.disable()
        stats = pstats.Stats(prof)
        steps = next((v[1] for k, v in stats.stats.items()
                      if k[0].endswith("engine/core.py") and k[2] == "step"), 1)
        per_step[name] = {(k[0], k[2]): v[3] / steps for k, v in stats.stats.items()}
        profiles[name] = stats

    def cum(name, key):
        return sum(t for (f, fn), t in per_step[name].items()
                   if f.endswith(key[0]) and fn == key[1])
    for key, label in PROFILED:
        print(f"{label:46s} {cum('plain', key) * 1e3:8.3f} {cum('json', key) * 1e3:8.3f}")
    buf = io.StringIO()
    profiles["json"].stream = buf
    profiles["json"].sort_stats("tottime").print_stats(12)
    print("constrained run, top functions by own time (whole run):")
    print(buf.getvalue()[buf.getvalue().find("ncalls"):])


def engines_bench(args) -> None:
    import llguidance
    import llguidance.torch as llt
    import torch
    import xgrammar as xgr

    from tokenfactory.text.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(default_model_path())
    vocab, eos = tok.vocab_size, sorted(tok.eos_token_ids)
    instance = {"name": "Alice Smith", "age": 42, "tags": ["red", "blue"], "notes": "fine"}
    toks = tok.encode(json.dumps(instance, separators=(",", ":")))
    schema_text = json.dumps(ENGINES_SCHEMA)

    t0 = time.perf_counter()
    enc = [""] * vocab
    for s, i in tok.backend.get_vocab(with_added_tokens=True).items():
        enc[i] = s
    info = xgr.TokenizerInfo(enc, xgr.VocabType.BYTE_LEVEL, vocab_size=vocab, stop_token_ids=eos)
    comp = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    print(f"xgrammar   tokenizer info {time.perf_counter() - t0:.2f} s")
    t0 = time.perf_counter()
    cg = comp.compile_json_schema(schema_text, any_whitespace=False, separators=(",", ":"))
    print(f"xgrammar   compile {(time.perf_counter() - t0) * 1e3:.2f} ms")
    for batch in (1, 16):
        ms = [xgr.GrammarMatcher(cg) for _ in range(batch)]
        bm = xgr.allocate_token_bitmask(batch, vocab)
        bmm = xgr.BatchGrammarMatcher(max_threads=2)
        times = []
        for t in toks:
            t0 = time.perf_counter()
            if batch == 1:
                ms[0].fill_next_token_bitmask(bm, 0)
            else:
                bmm.batch_fill_next_token_bitmask(ms, bm)
            times.append(time.perf_counter() - t0)
            for m in ms:
                assert m.accept_token(t)
        print(f"xgrammar   mask batch {batch:2d}: median {statistics.median(times) * 1e6:.1f} us"
              f" max {max(times) * 1e6:.1f} us")

    t0 = time.perf_counter()
    lt = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=vocab, eos_token=eos)
    print(f"llguidance tokenizer info {time.perf_counter() - t0:.2f} s")
    opts = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
    t0 = time.perf_counter()
    g = llguidance.LLMatcher.grammar_from_json_schema(ENGINES_SCHEMA, overrides=opts)
    llguidance.LLMatcher(lt, g, log_level=0)
    print(f"llguidance compile {(time.perf_counter() - t0) * 1e3:.2f} ms")
    ex = llguidance.LLExecutor()
    for batch in (1, 16):
        ms = [llguidance.LLMatcher(lt, g, log_level=0) for _ in range(batch)]
        bm = llt.allocate_token_bitmask(batch, vocab)
        times = []
        for t in toks:
            t0 = time.perf_counter()
            if batch == 1:
                llt.fill_next_token_bitmask(ms[0], bm, 0)
            else:
                llt.fill_next_token_bitmask_par(ex, [(m, i) for i, m in enumerate(ms)], bm)
            times.append(time.perf_counter() - t0)
            for m in ms:
                assert m.consume_token(t)
        print(f"llguidance mask batch {batch:2d}: median {statistics.median(times) * 1e6:.1f} us"
              f" max {max(times) * 1e6:.1f} us")
    from tokenfactory.text.grammar import allowed_tokens, mask_logits
    logits = torch.randn(16, vocab)
    for name, fn in (("torch masked_fill", lambda: logits.masked_fill(
            ~allowed_tokens(bm, vocab), float("-inf"))),
            ("grammar.mask_logits", lambda: mask_logits(torch.from_numpy(logits.numpy().copy()),
                                                        list(range(16)), bm))):
        fn()
        t0 = time.perf_counter()
        for _ in range(50):
            fn()
        print(f"applying a batch-16 mask to the logits, {name}: "
              f"{(time.perf_counter() - t0) / 50 * 1e6:.0f} us")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bfloat16", help="the serving default is bfloat16")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--tokens", type=int, default=64, help="tokens per row (forced)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating A/B rounds per batch (0: none, e.g. with --profile)")
    ap.add_argument("--profile", action="store_true", help="cProfile a constrained run too")
    ap.add_argument("--engines", action="store_true",
                    help="instead: xgrammar vs llguidance alone, no model (needs both)")
    args = ap.parse_args()
    if args.engines:
        engines_bench(args)
        return
    llm = LLM(default_model_path(), dtype=args.dtype, max_model_len=1024,
              kv_cache_memory=256 << 20, max_num_seqs=64)
    clock = StepClock()
    llm.engine.add_step_listener(clock)
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                               add_generation_prompt=True, tokenize=False)
    # warm-up: kernels, the tokenizer's grammar data, the compiled schema (then cached)
    run(llm, clock, prompt, 2, 8, StructuredOutput(json_schema=SCHEMA))
    sample = llm.generate([prompt], SamplingParams(
        temperature=0.0, max_tokens=args.tokens, ignore_eos=True,
        structured_output=StructuredOutput(json_schema=SCHEMA)), use_tqdm=False)[0]
    print(f"host: {os.cpu_count()} cores, shared with other work; uptime: "
          f"{os.popen('uptime').read().strip()}")
    print(f"dtype={args.dtype} tokens={args.tokens} rounds={args.rounds} "
          f"schema={json.dumps(SCHEMA, separators=(',', ':'))[:80]}...")
    print(f"constrained output (first {args.tokens} tokens): {sample.outputs[0].text!r}")
    if args.rounds:
        bench(llm, clock, prompt, args)
    if args.profile:
        profile(llm, prompt, args)
    print(f"uptime after: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
