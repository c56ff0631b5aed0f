"""Draft-model speculation on the real model: SmolLM2-135M-Instruct in bfloat16 (the Q4_1 GGUF
dequantized at load) as the target, the same Q4_1 file executed quantized
(``quantization="gguf"``, ``model/quant_linear.py``) as the draft.

The draft is as big as the target here (same architecture, 4-bit weights instead of 16-bit), so
this measures the mechanism and the acceptance of a quantized copy, not a speed-up a real small
draft would give. Three engines over one target executor, interleaved per request (A/B/C), each
through the engine's step loop with the prefix cache reset per run:

- ``off``: no speculation;
- ``draft``: the draft proposer with its cost measured (its own forwards timed, the target's
  steps learnt through a step listener): it drafts only where that pays;
- ``draft-free``: the same with the draft's own cost set to 0 (``draft_cost=0``): it drafts as
  if the draft were free, which shows the acceptance at full draft lengths and what the draft's
  forwards cost.

Output tokens/s over the whole request (prefill included), ``--clock cpu`` = process CPU time:
run with one thread on a shared host::

    taskset -c 1 .venv/bin/python benchmarks/spec_draft.py --clock cpu --requests 3 \
        --max-tokens 256 --workloads chat,edit --k 4

Measured 2026-11-29 20:31-20:41 UTC with that command (host shared by 6 engineers, load ~11;
one thread, CPU time; 3 requests one at a time per workload; edit prompts 1-3K tokens, 256
output tokens each; chat answers end on their own, 308 tokens in all). "without prefill": the
seconds the draft spent prefilling prompts (``DraftModelProposer.prefill_seconds``) taken out::

    workload engine      tok/s  vs off  without prefill  acceptance  mean accepted  draft cost
    chat     off         76.8   1.00x   -                -           -              -
    chat     draft       62.1   0.81x   0.99x            100%        2.00           0.85
    chat     draft-free  67.9   0.88x   1.19x            95.6%       4.49           0.59
    edit     off         41.9   1.00x   -                -           -              -
    edit     draft       35.8   0.85x   1.01x            100%        2.00           1.12
    edit     draft-free  32.7   0.78x   1.10x            98.1%       4.87           0.59

Outputs identical to ``off`` in every row. The quantized copy agrees with the bf16 target on
95-98% of drafted tokens (4.5-4.9 tokens per step at K = 4), and a drafted token costs 0.59 of
a target decode step (Q4_1 weights, same depth): per token that would pay (1.10-1.19x), but the
draft must also prefill every prompt, as costly as the target's own prefill, which the short
outputs here do not amortize. With its cost measured ("draft"), the proposer probes once, times
the probe (a catch-up run plus one token: 0.85-1.12 of a target step per drafted token, more
than at full length), finds that a drafted token costs a whole step with its verification row
(0.4) and stops drafting: the loss is the one prompt prefill.
"""
from __future__ import annotations

import argparse
import itertools
import time

from tokenfactory.bench import workloads as W
from tokenfactory.engine.core import EngineConfig, EngineCore
from tokenfactory.engine.llm import build_engine_core
from tokenfactory.engine.sampling_params import SamplingParams
from tokenfactory.model.default import default_model_path
from tokenfactory.model.proposers.draft import DraftModelProposer

_IDS = itertools.count()


def prompts_for(tokenizer, name: str, n: int, seed: int, max_tokens: int):
    """(prompt ids, SamplingParams) for n requests of the "edit" or "chat" workload."""
    wl = (W.edit(seed=seed, requests=n) if name == "edit"
          else W.chat(seed=seed, requests=n, rate=0.0, output_tokens=256))
    out = []
    for s in wl.sessions:
        turn = s.turns[0]
        text = tokenizer.apply_chat_template([{"role": "system", "content": s.system},
                                              {"role": "user", "content": turn.user}])
        out.append((tokenizer.encode(text),
                    SamplingParams(temperature=0.0, max_tokens=min(turn.max_tokens, max_tokens))))
    return out


def run(engine: EngineCore, batch, clock) -> tuple[list[list[int]], float]:
    """Generate ``batch`` together; (token ids per request, seconds by ``clock``)."""
    engine.reset_prefix_cache()          # the engines share the executor's pages
    ids = [f"d-{next(_IDS)}" for _ in batch]
    for rid, (prompt, params) in zip(ids, batch):
        engine.add_request(rid, prompt, params)
    out = {}
    t0 = clock()
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = list(o.outputs[0].token_ids)
    return [out[r] for r in ids], clock() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    p.add_argument("--k", type=int, default=4, help="draft tokens per step at most")
    p.add_argument("--requests", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--workloads", default="chat,edit")
    p.add_argument("--concurrency", default="1", help="1: one request at a time; n: n together")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    import torch
    path = default_model_path()
    cfg = dict(kv_cache_memory=512 << 20, max_num_seqs=8, max_model_len=4096)
    base = build_engine_core(path, dtype="bfloat16", clock=clock, **cfg)
    tok, ex = base.tokenizer, base.executor
    engines = {"off": base}
    drafts = {}
    for name, cost in (("draft", None), ("draft-free", 0.0)):
        draft = DraftModelProposer(path, vocab_size=ex.model_config.vocab_size, dtype=ex.dtype,
                                   quantization="gguf", draft_kv_tokens=16384, draft_cost=cost,
                                   clock=clock)
        core = EngineCore(ex, EngineConfig(num_speculative_tokens=args.k, **cfg),
                          model_max_len=ex.max_model_len, tokenizer=tok, clock=clock,
                          eos_token_ids=tok.eos_token_ids, proposer=draft)
        core.add_step_listener(draft.on_target_step)
        engines[name], drafts[name] = core, draft
    print(f"clock {args.clock}; torch threads {torch.get_num_threads()}; K <= {args.k}; "
          f"target {ex.dtype}, draft quantized: "
          f"{type(drafts['draft'].executor.model.layers[0].mlp.down_proj).__name__}")
    print("| workload | conc | engine | out tokens | tok/s | vs off | tok/s without the draft's "
          "prompt prefill | vs off | acceptance | mean accepted length | drafted/step | draft cost "
          "measured (target 1-row steps per drafted token) | identical |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for wname in args.workloads.split(","):
        for conc in [int(c) for c in args.concurrency.split(",")]:
            items = prompts_for(tok, wname, max(args.requests, conc), args.seed, args.max_tokens)
            groups = [items[i:i + conc] for i in range(0, len(items), conc)]
            agg = {k: {"tokens": 0, "secs": 0.0, "ids": []} for k in engines}
            before = {k: _counts(e) for k, e in engines.items()}
            prefill0 = {k: d.prefill_seconds for k, d in drafts.items()}
            for group in groups:
                for key, engine in engines.items():      # interleaved per group
                    ids, secs = run(engine, group, clock)
                    agg[key]["tokens"] += sum(map(len, ids))
                    agg[key]["secs"] += secs
                    agg[key]["ids"] += ids
            off = agg["off"]["tokens"] / agg["off"]["secs"]
            for key, engine in engines.items():
                a = agg[key]
                rate = a["tokens"] / a["secs"]
                # the draft's own prompt prefill (paid once per request) taken out
                steady = a["tokens"] / (a["secs"] - (drafts[key].prefill_seconds - prefill0[key]
                                                     if key in drafts else 0.0))
                n, proposed, accepted = (x - y for x, y in zip(_counts(engine), before[key]))
                spec = (f"{accepted / proposed:.1%} | {1 + accepted / n:.2f} | {proposed / n:.2f}"
                        if n and proposed else "- | - | -")
                measured = drafts[key].measured_draft_cost if key in drafts else None
                cost = "-" if measured is None else f"{measured:.2f}"
                print(f"| {wname} | {conc} | {key} | {a['tokens']} | {rate:.1f} | "
                      f"{rate / off:.2f}x | {steady:.1f} | {steady / off:.2f}x | {spec} | {cost} | "
                      f"{a['ids'] == agg['off']['ids']} |", flush=True)


def _counts(engine: EngineCore) -> tuple[int, int, int]:
    """(request-steps with drafts, draft tokens, accepted tokens) so far."""
    s = engine.spec_stats.get("draft")
    return (s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens) if s else (0, 0, 0)


if __name__ == "__main__":
    main()
