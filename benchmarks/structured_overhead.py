"""Inter-token latency with structured outputs vs without, on the real default model.

    nice -n 10 .venv/bin/python benchmarks/structured_overhead.py [--dtype bfloat16]
        [--batches 1 16] [--tokens 48] [--repeats 3]

For each batch size: B identical chat prompts, greedy, once unconstrained and once constrained.
First to a regex that never completes (any text without control characters) with
min_tokens = max_tokens, so both runs decode exactly the same number of steps with the grammar
working on every one; then to a JSON schema (output lengths then differ; the per-step time is
compared). The ITL is (time of the whole generate - time to the first token) / (steps - 1);
the ratio is constrained / unconstrained, median over ``--repeats`` runs, alternating the two so
load changes hit both alike. On a shared machine the ITL ratio is noisy, so the script also
times the structured-output work itself (mask fill + unpack + logits mask in the sampler,
matcher updates in the engine) per step, as a share of an unconstrained step.

``--engines`` instead compares xgrammar and llguidance alone (no model): tokenizer setup,
schema compile time and per-step mask time at batch 1 and 16 (needs both installed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from tokenfactory import LLM, SamplingParams
from tokenfactory.engine.sampling_params import StructuredOutput
from tokenfactory.model.default import default_model_path

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}},
    "notes": {"type": "string"}},
    "required": ["name", "age", "tags", "notes"], "additionalProperties": False}


class GrammarTimer:
    """Wall time spent in the structured-output machinery: the sampler's mask step (fill the
    batch bitmask, unpack it, mask the logits) and the engine's matcher updates."""

    def __init__(self):
        from tokenfactory.model.sampler import Sampler
        from tokenfactory.text.grammar import GrammarMatcher
        self.seconds = 0.0
        self.steps = 0
        timer = self

        def timed(fn, count_step):
            def wrapper(*a, **kw):
                t0 = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    timer.seconds += time.perf_counter() - t0
                    timer.steps += count_step
            return wrapper
        import tokenfactory.text.grammar as grammar
        self.fill = 0.0
        inner = grammar.fill_bitmasks

        def fill(*a, **kw):
            t0 = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                timer.fill += time.perf_counter() - t0
        grammar.fill_bitmasks = fill
        Sampler._apply_grammars = timed(Sampler._apply_grammars, 1)
        GrammarMatcher.accept = timed(GrammarMatcher.accept, 0)
        GrammarMatcher.is_terminated = timed(GrammarMatcher.is_terminated, 0)

    def reset(self) -> None:
        self.seconds, self.steps, self.fill = 0.0, 0, 0.0


def itl_run(llm: LLM, prompt: str, batch: int, tokens: int, spec: StructuredOutput | None,
            fixed_length: bool) -> tuple[float, int]:
    """(seconds per decode step, decode steps) for one batch of identical greedy requests.
    ``fixed_length``: min_tokens = max_tokens = tokens, so EOS is masked and every row
    decodes exactly ``tokens`` tokens (a regex that never closes keeps the grammar going)."""
    params = SamplingParams(temperature=0.0, max_tokens=tokens, structured_output=spec,
                            min_tokens=tokens if fixed_length else 0, ignore_eos=fixed_length)
    t0 = time.perf_counter()
    outs = llm.generate([prompt] * batch, params, use_tqdm=False)
    total = time.perf_counter() - t0
    first = max(o.metrics.first_token_time - o.metrics.arrival_time for o in outs)
    steps = max(len(o.outputs[0].token_ids) for o in outs)
    return (total - first) / max(steps - 1, 1), steps


def model_bench(args) -> None:
    llm = LLM(default_model_path(), dtype=args.dtype, max_model_len=1024,
              kv_cache_memory=256 << 20, max_num_seqs=64)
    timer = GrammarTimer()
    prompt = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short sentence about the sea."}],
        add_generation_prompt=True, tokenize=False)
    # any text without control characters: never complete, so it constrains every step
    regex = StructuredOutput(regex=r"[^\x00-\x1f]+")
    schema = StructuredOutput(json_schema=SCHEMA)
    itl_run(llm, prompt, 2, 4, regex, True)   # warm-up: kernels, tokenizer info, grammar cache
    print(f"uptime: {os.popen('uptime').read().strip()}")
    print(f"dtype={args.dtype} tokens={args.tokens} repeats={args.repeats}")
    for batch in args.batches:
        for name, spec, fixed in (("regex", regex, True), ("json_schema", schema, False)):
            base, cons, steps, share, fills = [], [], [], [], []
            for _ in range(args.repeats):   # alternating, so load changes hit both alike
                base.append(itl_run(llm, prompt, batch, args.tokens, None, fixed)[0])
                timer.reset()
                t, n = itl_run(llm, prompt, batch, args.tokens, spec, fixed)
                cons.append(t)
                steps.append(n)
                share.append(timer.seconds / max(timer.steps, 1))
                fills.append(timer.fill / max(timer.steps, 1))
            b, c, g = statistics.median(base), statistics.median(cons), statistics.median(share)
            print(f"batch {batch:3d} {name:12s} ITL plain {b * 1e3:7.2f} ms  constrained "
                  f"{c * 1e3:7.2f} ms  ratio {c / b:5.3f} | grammar work {g * 1e3:6.3f} ms/step"
                  f" (llguidance masks {statistics.median(fills) * 1e3:6.3f})"
                  f" = {g / b * 100:4.1f}% of a plain step (steps {steps})")


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
    schema_text = json.dumps(SCHEMA)

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
    g = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, overrides=opts)
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
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engines", action="store_true", help="compare xgrammar and llguidance")
    ap.add_argument("--parallel-fill-min-rows", type=int, default=None,
                    help="override grammar.PARALLEL_FILL_MIN_ROWS (huge: always serial)")
    args = ap.parse_args()
    if args.parallel_fill_min_rows is not None:
        import tokenfactory.text.grammar as grammar
        grammar.PARALLEL_FILL_MIN_ROWS = args.parallel_fill_min_rows
    engines_bench(args) if args.engines else model_bench(args)


if __name__ == "__main__":
    main()
