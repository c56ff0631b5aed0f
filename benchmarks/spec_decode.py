"""Speculative decoding on the real model (SmolLM2-135M-Instruct, Q4_1 GGUF), in process.

Three modes:

``--offline`` (works without engine support): the model's greedy answers to the "edit a file"
and chat workloads (``tokenfactory.bench.workloads``) are generated once without speculation,
then replayed through each proposer exactly as the engine would drive it: at every step the
proposer sees prompt + output so far and proposes up to K tokens; the accepted length is the
longest prefix equal to the real continuation (greedy verification accepts exactly that), plus
the target's own token; ``observe`` feeds the adaptivity. Reports tokens per step (the mean
accepted length, the ceiling on the speed-up), the acceptance rate and the proposer's own time
per call. Greedy answers are cached in ``--cache`` (JSON) so replays are cheap.

default (online): ``LLM(default_model_path(), speculative=NAME, num_speculative_tokens=K)``
against the same engine without, edit + chat, at concurrency 1 (``--requests`` one at a time)
and 8, interleaved A/B rounds, through the engine's step loop: reports output tokens/s over
the whole request and in the decode phase (steps with no prompt left to compute), the seconds
of each phase, the ratios, the engine's ``spec_stats`` (acceptance, mean accepted length, drafted
tokens per step) and whether the outputs are identical (they must be, at temperature 0). The
edit workload asks for the whole file back (``max_tokens`` = the file + 64, as a real edit).

``--step-cost``: one native decode step with 1..8 rows of one request (the cost of verifying
1..7 drafted positions) at each ``--contexts`` length.

``--clock cpu`` times with the process's CPU time: on a shared host, run with one thread
(``taskset -c 1``) so the figure is the work done, not the share of the cores obtained.

    .venv/bin/python benchmarks/spec_decode.py --offline
    taskset -c 1 .venv/bin/python benchmarks/spec_decode.py --clock cpu --step-cost
    taskset -c 1 .venv/bin/python benchmarks/spec_decode.py --clock cpu --k 7 --rounds 1 \
        --requests 2 --workloads edit,chat --concurrency 1,8 --proposers ngram,suffix

Shared 2-core host: keep runs short and compare only ratios measured in the same run.

Measured 2026-11-29 evening, after the verification-speed work (a request's rows attend
together; register-tiled few-row linears; ``Acceptance.row_cost`` 0.2), online, host shared by
6 engineers, one thread (``taskset -c 1``), CPU-time clock, one interleaved round, K <= 7.

``--clock cpu --step-cost --rounds 9``: a 1-row step costs 9.6 ms at a 128-token context and
11.6 ms at 2K; 2 / 4 / 8 rows cost 1.12x / 1.39x / 1.99x (128) and 1.17x / 1.62x / 2.53x
(2K): 1.4 ms (0.14 of a step) and 2.5 ms (0.22) per extra row, was 3.5 and 5.6 ms.

    workload conc proposer  whole request  decode phase  mean accepted  acceptance
    edit     1    ngram     1.95x          2.17x         4.59           79.4%   (2 files)
    edit     1    suffix    2.23x          2.61x         6.30           90.3%
    edit     1    ngram     2.05x          2.28x         4.21           92.3%   (--seed 1)
    chat     1    ngram     2.04x          2.73x         6.48           94.4%   (6 requests)
    chat     1    suffix    2.00x          2.56x         5.29           91.9%
    agentic  1    ngram     1.16x          1.76x         3.76           68.9%   (6 requests)
    agentic  1    suffix    1.16x          1.87x         3.55           76.9%
    chat     8    ngram     1.17x          1.27x         2.27           98.8%   (--max-tokens 600)
    agentic  8    ngram     1.03x          1.05x         -              (no drafts: 8 rows)

Edit (suffix): 63 -> 141 output tok/s over the whole request (prefill 7.3 s of 68 s CPU
without speculation), 71 -> 185 in the decode phase; outputs identical in every row above.
Agentic stays near 1.2x over the whole request because its prefill is ~2/3 of the CPU time.
Commands (edit / chat + agentic / concurrency 8)::

    taskset -c 1 .venv/bin/python benchmarks/spec_decode.py --clock cpu --k 7 --rounds 1 \
        --requests 2 --workloads edit --concurrency 1 --proposers ngram,suffix
    taskset -c 1 .venv/bin/python benchmarks/spec_decode.py --clock cpu --k 7 --rounds 1 \
        --requests 6 --workloads chat,agentic --concurrency 1 --proposers ngram,suffix
    taskset -c 1 .venv/bin/python benchmarks/spec_decode.py --clock cpu --k 7 --rounds 1 \
        --workloads chat,agentic --concurrency 8 --max-tokens 600 --proposers ngram

Before that work (the figures below): measured 2026-11-29, online, host shared by 7 engineers (load 12-25), so: one thread
(``taskset -c 1``), CPU-time clock, one interleaved round; SmolLM2 Q4_1 dequantized to
bfloat16, native decode step; K <= 7, the draft length chosen per request by the cost model
(``model/proposers/base.py``: row cost 0.4 of a 1-row step).

``--clock cpu --step-cost`` (one thread): a 1-row decode step costs 10.2 ms at a 128-token
context and 14.0 ms at 2K; 2 / 5 / 8 rows cost 1.27x / 1.94x / 3.45x (128) and 1.44x / 2.60x /
4.37x (2K) of it: each verified position adds 3.5-6 ms (the small-batch kernels are
compute-bound per row once the weights are read; at 2K each row's attention adds ~2.5 ms).
That, not acceptance, is what bounds the speed-up: 6 accepted tokens per step at 2K cost ~3.5
steps.

``--clock cpu --k 7 --rounds 1 --requests 2 --workloads edit,chat --concurrency 1``
(edit: 2 files of 1.5-2K tokens, the whole file asked back, ~2K output tokens each)::

    workload conc proposer  whole request  decode phase  mean accepted  acceptance
    edit     1    ngram     1.35x          1.40x         4.24           85.1%
    edit     1    suffix    1.41x          1.48x         6.11           89.7%
    chat     1    ngram     1.68x          1.92x         6.17           94.6%   (6 requests)
    chat     1    suffix    1.68x          1.91x         5.62           95.2%   (6 requests)
    chat     8    ngram     0.96x          0.94x         2.26           99.2%   (--max-tokens 600)
    edit     8    ngram     0.99x          0.99x         -              (no drafts: 8 rows)
    agentic  1    ngram     1.09x          1.32x         3.06           77.1%   (6 requests)
    agentic  1    suffix    1.09x          1.30x         3.04           82.3%
    agentic  8    ngram     1.00x          1.01x         -              (no drafts: 8 rows)

(concurrency 8: ``--concurrency 8 --proposers ngram --max-tokens 600 --workloads
chat,edit,agentic``; agentic: 128-token answers after 1.3-4K-token prompts, prefill ~2/3 of
the CPU time since every run resets the prefix cache.)

Edit: 56 -> 79 output tok/s over the whole request (prefill 6.7 s of 77 s CPU), 61 -> 90 in
the decode phase; outputs identical. Chat's high acceptance is SmolLM2 looping in its own
answers (see below). At concurrency 8 the 8 decode rows fill the native step: drafts ride only
when fewer requests remain (``SchedulerConfig.max_speculative_rows``).

Measured 2026-11-29 (offline replay; host shared by 8 engineers, load ~14, so the us/call are
inflated): ``--offline --requests 3 --max-tokens 700``, engine greedy answers (3 edits of
1.3-2.1K-token prompts, 2,100 output tokens; 3 chat answers, 308 tokens):

    workload proposer K  tokens/step  acceptance  draft tok/step  us/call
    edit     ngram    4     3.75         89.1%        3.09           34
    edit     ngram    8     4.72         81.6%        4.56           44
    edit     suffix   4     3.94         92.8%        3.17          121
    edit     suffix   8     5.57         90.6%        5.05          211
    chat     ngram    8     3.42         84.2%        2.89            7
    chat     suffix   8     2.93         87.6%        2.22           69

SmolLM2-135M falls into repetition loops (one edit answer repeats a line; one 256-token chat
answer repeats a sentence), which proposals also catch: the chat figure is that one looping
answer; the two short, non-looping chat answers get 1.0-1.5 tokens/step. Tokens/step is the
ceiling on the speed-up; the real one also pays for the k extra positions per step.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

from tokenfactory.bench import workloads as W
from tokenfactory.engine.sampling_params import SamplingParams
from tokenfactory.model.default import default_model_path
from tokenfactory.model.proposers import make_proposer

_IDS = itertools.count()


def build_prompts(tokenizer, name: str, n: int, seed: int) -> list[tuple[list[int], int]]:
    """(prompt ids, max_tokens) for n requests of workload ``name`` ("edit" | "chat" |
    "agentic": turn t of a session is its conversation so far, scripted replies and tool
    results included, with a 1.5K-token shared prefix and 128-token answers)."""
    if name == "agentic":
        wl = W.agentic(seed=seed, sessions=max(1, (n + 2) // 3), turns=4, prefix_tokens=1536,
                       tool_max=600, output_tokens=128)
        out = []
        for s in wl.sessions:
            messages = [{"role": "system", "content": s.system}]
            for t, turn in enumerate(s.turns):
                if turn.assistant is not None:
                    messages.append({"role": "assistant", "content": turn.assistant})
                messages.append({"role": "user", "content": turn.user})
                if t >= 1:
                    text = tokenizer.apply_chat_template(messages)
                    out.append((tokenizer.encode(text), turn.max_tokens))
        return out[:n]
    if name == "edit":
        wl = W.edit(seed=seed, requests=n)
    else:
        wl = W.chat(seed=seed, requests=n, rate=0.0, output_tokens=256)
    out = []
    for s in wl.sessions:
        turn = s.turns[0]
        text = tokenizer.apply_chat_template([{"role": "system", "content": s.system},
                                              {"role": "user", "content": turn.user}])
        out.append((tokenizer.encode(text), turn.max_tokens))
    return out


def replay(proposer, prompt: list[int], output: list[int], k: int, rid: str) -> dict:
    """Drive ``proposer`` over a known greedy output as the engine would; count what greedy
    verification would accept."""
    pos = steps = drafts = proposed = accepted = 0
    seconds = 0.0
    context = list(prompt)
    while pos < len(output):
        t0 = time.perf_counter()
        draft = proposer.propose(rid, context, k)
        seconds += time.perf_counter() - t0
        ok = 0
        while ok < len(draft) and pos + ok < len(output) and draft[ok] == output[pos + ok]:
            ok += 1
        if draft:
            proposer.observe(rid, ok, len(draft))
            drafts += 1
        proposed += len(draft)
        accepted += ok
        n_new = min(ok + 1, len(output) - pos)
        context.extend(output[pos:pos + n_new])
        pos += n_new
        steps += 1
    proposer.finished(rid)
    return dict(tokens=len(output), steps=steps, drafts=drafts, proposed=proposed,
                accepted=accepted, seconds=seconds)


def greedy_outputs(args, names: list[str]) -> dict[str, list[dict]]:
    """The model's greedy answers per workload (cached in --cache): from our engine, or with
    ``--reference transformers`` from transformers' own generate() on the same GGUF weights
    (dequantized by transformers; greedy text may differ slightly from the Q4_1 kernels')."""
    cache = Path(args.cache)
    if cache.exists():
        data = json.loads(cache.read_text())
        if all(n in data for n in names):
            return data
    from tokenfactory.text.tokenizer import Tokenizer
    path = default_model_path()
    tokenizer = Tokenizer.from_gguf(path)
    if args.reference == "transformers":
        import torch
        import transformers
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                  dtype=torch.float32).eval()

        def generate(prompts):
            outs = []
            for ids, max_tokens in prompts:
                with torch.inference_mode():
                    o = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens,
                                       do_sample=False, eos_token_id=sorted(tokenizer.eos_token_ids),
                                       pad_token_id=0)
                outs.append(o[0, len(ids):].tolist())
            return outs
    else:
        from tokenfactory.engine.llm import LLM
        llm = LLM(path, kv_cache_memory=512 << 20, max_num_seqs=8)

        def generate(prompts):
            res = llm.generate([p for p, _ in prompts],
                               [SamplingParams(temperature=0.0, max_tokens=m) for _, m in prompts])
            return [list(o.outputs[0].token_ids) for o in res]
    data = {}
    for name in names:
        prompts = build_prompts(tokenizer, name, args.requests, args.seed)
        prompts = [(p, min(m, args.max_tokens)) for p, m in prompts]
        t0 = time.perf_counter()
        outs = generate(prompts)
        dt = time.perf_counter() - t0
        data[name] = [{"prompt": p, "output": o} for (p, _), o in zip(prompts, outs)]
        print(f"[spec] {name}: {len(prompts)} greedy answers ({args.reference}), "
              f"{sum(map(len, outs))} tokens in {dt:.0f} s")
    cache.write_text(json.dumps(data))
    return data


def offline(args) -> None:
    names = ["edit", "chat"]
    data = greedy_outputs(args, names)
    print("| workload | proposer | K | output tokens | tokens/step (mean accepted length) | "
          "acceptance rate | draft tokens/step | proposer us/call |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        for spec in args.proposers.split(","):
            for k in [int(x) for x in args.k.split(",")]:
                proposer = make_proposer(spec)
                tot = dict(tokens=0, steps=0, drafts=0, proposed=0, accepted=0, seconds=0.0)
                for i, item in enumerate(data[name]):
                    r = replay(proposer, item["prompt"], item["output"], k, f"{name}-{i}")
                    for key in tot:
                        tot[key] += r[key]
                rate = tot["accepted"] / tot["proposed"] if tot["proposed"] else 0.0
                print(f"| {name} | {spec} | {k} | {tot['tokens']} | "
                      f"{tot['tokens'] / tot['steps']:.2f} | {rate:.1%} | "
                      f"{tot['proposed'] / tot['steps']:.2f} | "
                      f"{1e6 * tot['seconds'] / tot['steps']:.0f} |")


def _build_params(args, name: str, n: int, tokenizer) -> tuple[list[list[int]], list[SamplingParams]]:
    prompts = build_prompts(tokenizer, name, n, args.seed)
    return ([p for p, _ in prompts],
            [SamplingParams(temperature=0.0, max_tokens=min(m, args.max_tokens)) for _, m in prompts])


def _run(llm, prompts, params, clock) -> dict:
    """Generate ``prompts`` together through the engine's step loop, timing each step with
    ``clock``. A step is "prefill" while any request still has prompt tokens to compute, else
    "decode". Returns token lists, seconds per phase and output tokens made in decode steps."""
    engine = llm.engine
    engine.reset_prefix_cache()                 # every round pays its prefill (rounds repeat prompts)
    ids = [f"spec-{next(_IDS)}" for _ in prompts]
    for rid, p, sp in zip(ids, prompts, params):
        engine.add_request(rid, p, sp)
    out = {rid: [] for rid in ids}
    t = {"prefill": 0.0, "decode": 0.0}
    decode_tokens = steps = 0
    sched = engine.scheduler
    while engine.has_unfinished_requests():
        phase = "prefill" if (len(sched.waiting) or any(
            r.num_computed_tokens < r.num_prompt_tokens for r in sched.running)) else "decode"
        t0 = clock()
        outs = engine.step()
        t[phase] += clock() - t0
        steps += 1
        for o in outs:
            if o.request_id in out:
                new = list(o.outputs[0].token_ids)
                if phase == "decode":
                    decode_tokens += len(new) - len(out[o.request_id])
                out[o.request_id] = new
    return dict(ids=[out[r] for r in ids], steps=steps, decode_tokens=decode_tokens, **t)


def online(args) -> None:
    """Interleaved A/B rounds of the real engine with and without each proposer."""
    import torch
    from tokenfactory.engine.llm import LLM
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    kw = dict(kv_cache_memory=512 << 20, max_num_seqs=8, quantization=args.quantization)
    engines = {"off": LLM(default_model_path(), **kw)}
    for spec in args.proposers.split(","):
        engines[spec] = LLM(default_model_path(), speculative=spec,
                            num_speculative_tokens=int(args.k.split(",")[0]), **kw)
    tokenizer = engines["off"].tokenizer
    print(f"clock: {args.clock}; torch threads {torch.get_num_threads()}; K <= {args.k.split(',')[0]}")
    print("| workload | concurrency | engine | out tok/s whole request | vs off | decode-phase "
          "tok/s | vs off | prefill s | decode s | identical | speculation |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.workloads.split(","):
        for conc in [int(c) for c in args.concurrency.split(",")]:
            prompts, params = _build_params(args, name, max(conc, args.requests if conc == 1 else conc),
                                            tokenizer)
            groups = ([[i] for i in range(len(prompts))] if conc == 1
                      else [list(range(len(prompts)))])
            agg = {key: {"tokens": 0, "prefill": 0.0, "decode": 0.0, "decode_tokens": 0,
                         "rates": [], "ids": None} for key in engines}
            before = {key: _counts(llm) for key, llm in engines.items()}
            for _ in range(args.rounds):              # interleaved A/B: drift hits both alike
                for group in groups:
                    for key, llm in engines.items():
                        r = _run(llm, [prompts[i] for i in group], [params[i] for i in group],
                                 clock)
                        a = agg[key]
                        n = sum(map(len, r["ids"]))
                        a["tokens"] += n
                        a["prefill"] += r["prefill"]
                        a["decode"] += r["decode"]
                        a["decode_tokens"] += r["decode_tokens"]
                        a["ids"] = (a["ids"] or {}) | {i: ids for i, ids in zip(group, r["ids"])}
            base = agg["off"]
            for key, llm in engines.items():
                a = agg[key]
                whole = a["tokens"] / (a["prefill"] + a["decode"])
                dec = a["decode_tokens"] / a["decode"] if a["decode"] else 0.0
                bw = base["tokens"] / (base["prefill"] + base["decode"])
                bd = base["decode_tokens"] / base["decode"] if base["decode"] else 0.0
                drafts, proposed, accepted = (x - y for x, y in zip(_counts(llm), before[key]))
                spec = (f"acceptance {accepted / proposed:.1%}, mean accepted length "
                        f"{1 + accepted / drafts:.2f}, {proposed / drafts:.2f} drafted/step"
                        if drafts and proposed else "")
                print(f"| {name} | {conc} | {key} | {whole:.1f} | {whole / bw:.2f}x | {dec:.1f} | "
                      f"{dec / bd if bd else 0:.2f}x | {a['prefill']:.1f} | {a['decode']:.1f} | "
                      f"{a['ids'] == base['ids']} | {spec} |", flush=True)


def step_cost(args) -> None:
    """Time of one native decode step with R rows of one request (R - 1 drafted positions)
    at each context length, against 1 row; interleaved, ``--clock``, median of ``--rounds``."""
    import torch
    from tokenfactory.engine.llm import LLM
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    ex = LLM(default_model_path(), kv_cache_memory=512 << 20, max_num_seqs=8).engine.executor
    if ex._native is None:
        raise SystemExit("no native decode step on this host/model")
    bs = ex.block_size
    rows = [1, 2, 3, 4, 5, 6, 8]
    print(f"clock: {args.clock}; torch threads {torch.get_num_threads()}")
    print("| context | " + " | ".join(f"{r} rows" for r in rows) + " | ms per extra row |")
    print("|---|" + "---|" * (len(rows) + 1))
    for ctx in [int(c) for c in args.contexts.split(",")]:
        pages = list(range(ctx // bs + 2))

        def step(r):
            pos = [ctx + i for i in range(r)]
            return lambda: ex._native([100 + i for i in range(r)], pos,
                                      [pages[p // bs] * bs + p % bs for p in pos], [pages] * r)
        calls = {r: step(r) for r in rows}
        times = {r: [] for r in rows}
        with torch.inference_mode():
            for f in calls.values():
                f()
            for _ in range(max(3, args.rounds)):
                for r, f in calls.items():
                    t0 = clock()
                    f()
                    times[r].append(clock() - t0)
        med = {r: 1000 * statistics.median(v) for r, v in times.items()}
        slope = (med[rows[-1]] - med[1]) / (rows[-1] - 1)
        print(f"| {ctx} | " + " | ".join(f"{med[r]:.1f} ms ({med[r] / med[1]:.2f}x)" for r in rows)
              + f" | {slope:.2f} ({slope / med[1]:.2f} of a 1-row step) |", flush=True)


def _counts(llm) -> tuple[int, int, int]:
    """(drafts, draft tokens, accepted tokens) over every proposer of an engine so far."""
    stats = getattr(llm.engine, "spec_stats", None) or {}
    return (sum(s.num_drafts for s in stats.values()),
            sum(s.num_draft_tokens for s in stats.values()),
            sum(s.num_accepted_tokens for s in stats.values()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--offline", action="store_true", help="replay greedy outputs through the proposers")
    p.add_argument("--step-cost", action="store_true",
                   help="time native decode steps of 1..8 rows (the cost of verifying drafts)")
    p.add_argument("--contexts", default="128,2000", help="--step-cost: context lengths")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: process CPU time, robust on a shared host with one thread "
                        "(run under `taskset -c N`)")
    p.add_argument("--proposers", default="ngram,suffix")
    p.add_argument("--k", default="4,8", help="draft lengths (online: the first)")
    p.add_argument("--requests", type=int, default=4,
                   help="offline: answers per workload; online at concurrency 1: requests, one at a time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantization", choices=["auto", "gguf", "none"], default="auto",
                   help="online: how the Q4_1 file's weights run (auto: the serving default, "
                        "as stored where the VNNI kernels are)")
    p.add_argument("--workloads", default="edit,chat", help="online: which workloads")
    p.add_argument("--concurrency", default="1,8", help="online: batch sizes (1: one at a time)")
    p.add_argument("--rounds", type=int, default=2, help="online: interleaved A/B rounds")
    p.add_argument("--max-tokens", type=int, default=4096, help="output cap per request")
    p.add_argument("--reference", choices=["engine", "transformers"], default="engine",
                   help="offline: who generates the greedy answers")
    p.add_argument("--cache", default="/tmp/tokenfactory_spec_greedy.json")
    args = p.parse_args()
    if args.offline:
        offline(args)
    elif args.step_cost:
        step_cost(args)
    else:
        online(args)


if __name__ == "__main__":
    main()
