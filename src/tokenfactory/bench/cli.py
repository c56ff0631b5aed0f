"""`tokenfactory bench` — measure a server (ours, a peer, or the naive baseline) on a workload.

    tokenfactory bench --workload agentic --target self,naive --json out.json
    tokenfactory bench --workload chat --target http://127.0.0.1:8080 --api openai --label llama.cpp
    tokenfactory bench --workload edit --target self --server-arg=--speculative=ngram
    tokenfactory bench compare A.json B.json
    tokenfactory bench build-model --size 100m
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import os
import platform
import shlex
import signal
import sys
from pathlib import Path

from tokenfactory.bench import report
from tokenfactory.bench.workloads import WORKLOADS, Workload, build_workload, read_trace, write_trace


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenfactory bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=WORKLOADS, default="agentic")
    p.add_argument("--target", default="self",
                   help="comma-separated: URL (loopback only) | self | naive; all run on the same workload")
    p.add_argument("--api", choices=["anthropic", "openai"], default="anthropic")
    p.add_argument("--model", help="checkpoint directory (default: a random ~100M Llama built once into "
                                   "~/.cache/tokenfactory/bench-models)")
    p.add_argument("--model-size", choices=["100m", "tiny"], default="100m",
                   help="size of the built-in random checkpoint when --model is not given")
    p.add_argument("--model-name", default=None, help="`model` field sent to URL targets")
    p.add_argument("--label", default=None, help="name of a URL target in reports (e.g. llama.cpp)")
    p.add_argument("--metrics-key", default=None,
                   help="key for a URL target's /metrics (speculative-decoding counters)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="precision for self (forwarded as serve --dtype) and naive; default: checkpoint's")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra argument for `tokenfactory serve` (repeatable), e.g. --server-arg=--max-num-seqs=8")
    w = p.add_argument_group("workload")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--sessions", type=int, default=4, help="agentic: concurrent sessions")
    w.add_argument("--turns", type=int, default=10, help="agentic: calls per task")
    w.add_argument("--prefix-tokens", type=int, default=4096, help="agentic: system prompt + tool schemas")
    w.add_argument("--tool-min", type=int, default=200)
    w.add_argument("--tool-max", type=int, default=2000)
    w.add_argument("--think-time", type=float, default=0.1, help="agentic: mean seconds between turns")
    w.add_argument("--reply", choices=["scripted", "model"], default="scripted",
                   help="agentic history: scripted assistant turns (same prompts for every target) "
                        "or the model's own answers")
    w.add_argument("--no-tools", action="store_true", help="agentic: no tool schemas in the prefix")
    w.add_argument("--output-tokens", type=int, default=None, help="fixed output length (max_tokens + ignore_eos)")
    w.add_argument("--requests", type=int, default=None, help="chat/reasoning: number of requests")
    w.add_argument("--rate", type=float, default=None, help="chat/reasoning: Poisson arrivals per second (0: all at once)")
    w.add_argument("--document-tokens", type=int, default=6000, help="long-context: document size")
    w.add_argument("--questions", type=int, default=6, help="long-context: questions")
    w.add_argument("--concurrency", type=int, default=None,
                   help="long-context/chat/edit: requests in flight at most (edit: 1 by default)")
    w.add_argument("--file-min-tokens", type=int, default=1000, help="edit: smallest source file")
    w.add_argument("--file-max-tokens", type=int, default=3000, help="edit: largest source file")
    w.add_argument("--trace", help="replay this JSONL trace instead of generating a workload")
    w.add_argument("--write-trace", help="write the workload as a JSONL trace here")
    w.add_argument("--sweep", default=None, help="comma-separated session counts: run each target at each "
                                                 "(throughput vs concurrency plot)")
    w.add_argument("--naive-sessions", type=int, default=None,
                   help="run the naive target on the first N sessions only (it serves one request at a "
                        "time, so its cost per task does not depend on N; saves a lot of time)")
    b = p.add_argument_group("bounds and reporting")
    b.add_argument("--max-duration", type=float, default=1800.0, help="seconds per target run")
    b.add_argument("--max-requests", type=int, default=None)
    b.add_argument("--slo-ttft", type=float, default=None, help="goodput: TTFT target in seconds")
    b.add_argument("--slo-itl", type=float, default=None, help="goodput: time-per-output-token target in seconds")
    b.add_argument("--cost-per-hour", type=float, default=None, help="$ per machine-hour for $/M tokens")
    b.add_argument("--json", help="write the full result here")
    b.add_argument("--markdown", help="write the markdown table here")
    b.add_argument("--plots", help="write <prefix>_latency_cdf.png and <prefix>_throughput.png")
    b.add_argument("--no-roofline", action="store_true", help="skip measuring the host")
    b.add_argument("--no-progress", action="store_true")
    return p


def _tokens_per_word(model_dir: str | None) -> float:
    """Calibrate the text generator on the model's tokenizer (1.3 without one)."""
    if not model_dir or not (Path(model_dir) / "tokenizer.json").exists():
        return 1.3
    import random

    from tokenizers import Tokenizer

    from tokenfactory.bench.workloads import TextGen
    text = TextGen(random.Random(0)).words(3000)
    n = len(Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json")).encode(text).ids)
    return round(n / len(text.split()), 3)


def _tokens_per_char(model_dir: str | None) -> float | None:
    """Tokens per character of Python source on the model's tokenizer (None without one)."""
    if not model_dir or not (Path(model_dir) / "tokenizer.json").exists():
        return None
    from tokenizers import Tokenizer

    from tokenfactory.bench.workloads import EDIT_SOURCES, _stdlib_source
    text = "".join(t for name in EDIT_SOURCES[:4] if (t := _stdlib_source(name)))
    if not text:
        return None
    n = len(Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json")).encode(text).ids)
    return round(n / len(text), 4)


def make_workload(args, tokens_per_word: float, tokens_per_char: float | None = None) -> Workload:
    if args.trace:
        return read_trace(args.trace)
    kw: dict = {"tokens_per_word": tokens_per_word}
    if args.output_tokens is not None:
        kw["output_tokens"] = args.output_tokens
    if args.workload == "edit":
        kw.update(file_min=args.file_min_tokens, file_max=args.file_max_tokens)
        if tokens_per_char:
            kw["tokens_per_char"] = tokens_per_char
        for key in ("requests", "rate"):
            if getattr(args, key) is not None:
                kw[key] = getattr(args, key)
        if args.concurrency:
            kw["max_concurrency"] = args.concurrency
    elif args.workload == "agentic":
        kw.update(sessions=args.sessions, turns=args.turns, prefix_tokens=args.prefix_tokens,
                  tool_min=args.tool_min, tool_max=args.tool_max, think_time=args.think_time,
                  reply=args.reply, tools=not args.no_tools)
        if args.sweep:
            kw["sessions"] = max([args.sessions] + [int(x) for x in args.sweep.split(",")])
    elif args.workload == "long-context":
        kw.update(document_tokens=args.document_tokens, questions=args.questions)
        if args.concurrency:
            kw["concurrency"] = args.concurrency
    else:
        for key in ("requests", "rate"):
            if getattr(args, key) is not None:
                kw[key] = getattr(args, key)
        if args.concurrency:
            kw["max_concurrency"] = args.concurrency
    return build_workload(args.workload, args.seed, **kw)


def format_spec(spec: dict) -> str:
    """One line of speculation figures for the console and the markdown report."""
    def num(x, fmt):
        return "–" if x is None else fmt.format(x)
    return (f"acceptance {num(spec.get('acceptance_rate'), '{:.1%}')}, mean accepted length "
            f"{num(spec.get('mean_accepted_length'), '{:.2f}')} tokens/step, "
            f"{spec.get('num_accepted_tokens', 0):.0f}/{spec.get('num_draft_tokens', 0):.0f} "
            f"draft tokens kept in {spec.get('num_drafts', 0):.0f} drafts")


def _machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


def _make_target(spec: str, args, model_dir: str | None):
    from tokenfactory.bench.targets import HttpTarget, NaiveTarget, SelfTarget
    if spec == "self":
        server_args = list(args.server_arg)
        if args.dtype:
            server_args += ["--dtype", args.dtype]
        return SelfTarget(model_dir, args.api, server_args)
    if spec == "naive":
        return NaiveTarget(model_dir, args.dtype)
    t = HttpTarget(spec, args.api, args.model_name or (Path(model_dir).name if model_dir else "default"),
                   metrics_key=args.metrics_key)
    if args.label:
        t.label = args.label
    return t


async def _run_all(args, workload: Workload, model_dir: str | None, shape: dict | None, host: dict) -> list[dict]:
    from tokenfactory.bench.metrics import summarize
    from tokenfactory.bench.roofline import efficiency
    from tokenfactory.bench.runner import run_workload
    from tokenfactory.bench.targets import TargetError, spec_summary

    counts = [int(x) for x in args.sweep.split(",")] if args.sweep else [len(workload.sessions)]
    runs = []
    for spec in [s.strip() for s in args.target.split(",") if s.strip()]:
        try:
            target = _make_target(spec, args, model_dir)
            print(f"[bench] starting {spec} ...", file=sys.stderr)
            await target.start()
        except TargetError as exc:
            print(f"[bench] {spec}: {exc}", file=sys.stderr)
            runs.append({"target": spec, "error": str(exc), "metrics": {}})
            continue
        name = getattr(target, "label", None) or target.name
        try:
            for n in counts:
                if spec == "naive" and args.naive_sessions:
                    n = min(n, args.naive_sessions)
                wl = workload.head(n)
                counters = getattr(target, "spec_counters", None)
                spec_before = await counters() if counters else {}
                records, duration = await run_workload(
                    wl, target, max_duration=args.max_duration, max_requests=args.max_requests,
                    progress=not args.no_progress, desc=f"{name} S={n}")
                tasks = {s.id: len(s.turns) for s in wl.sessions}
                m = summarize(records, duration=duration, tasks=tasks, slo_ttft=args.slo_ttft,
                              slo_itl=args.slo_itl, cost_per_hour=args.cost_per_hour)
                eff = efficiency(records, m, shape, host, args.dtype) if shape else {}
                spec_stats = spec_summary(spec_before, await counters()) if counters else {}
                runs.append({"target": name, "kind": target.kind, "api": getattr(target, "api", None),
                             "sessions": n, "metrics": m, "efficiency": eff, "speculation": spec_stats,
                             "requests": report.records_to_dicts(records)})
                print(f"[bench] {name} S={n}: {m['completed_requests']}/{m['requests']} requests ok, "
                      f"{m['completed_tasks']}/{m['tasks']} tasks, {duration:.1f} s, "
                      f"hit rate {m['prefix_cache_hit_rate']:.1%}", file=sys.stderr)
                if spec_stats:
                    print(f"[bench]   speculation: {format_spec(spec_stats)}", file=sys.stderr)
                if m["failed_requests"]:
                    print(f"[bench]   errors: {m['errors']}", file=sys.stderr)
        finally:
            await target.stop()
    return runs


def run_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    targets = [s.strip() for s in args.target.split(",") if s.strip()]
    model_dir = args.model
    if model_dir is None and any(t in ("self", "naive") for t in targets):
        from tokenfactory.bench.checkpoint import build_bench_checkpoint
        model_dir = str(build_bench_checkpoint(args.model_size))
        print(f"[bench] using the random {args.model_size} checkpoint at {model_dir}", file=sys.stderr)
    shape = None
    if model_dir:
        from tokenfactory.bench.checkpoint import model_shape
        try:
            shape = model_shape(model_dir)
        except (OSError, KeyError, ValueError) as exc:
            print(f"[bench] no model shape for efficiency ({exc})", file=sys.stderr)
    try:
        workload = make_workload(args, _tokens_per_word(model_dir),
                                 _tokens_per_char(model_dir) if args.workload == "edit" else None)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.write_trace:
        write_trace(workload, args.write_trace)
        print(f"[bench] wrote {workload.num_requests} requests to {args.write_trace}", file=sys.stderr)
    host: dict = {}
    if not args.no_roofline:
        from tokenfactory.bench.roofline import host_roofline
        print("[bench] measuring the host roofline ...", file=sys.stderr)
        host = host_roofline()
        if "error" in host:
            print(f"[bench] roofline: {host['error']}", file=sys.stderr)
    def interrupted(signum, frame):             # SIGTERM/SIGINT: stop a `self` server on the way out
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupted) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        runs = asyncio.run(_run_all(args, workload, model_dir, shape, host))
    except KeyboardInterrupt:
        print("[bench] interrupted", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    result = {
        "tokenfactory_bench": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "tokenfactory bench " + shlex.join(argv),
        "machine": _machine(), "host_roofline": host,
        "model": {"dir": model_dir, **(shape or {})},
        "workload": {"name": workload.name, "seed": workload.seed, "params": workload.params,
                     "sessions": len(workload.sessions), "requests": workload.num_requests},
        "runs": runs,
    }
    good = [r for r in runs if r.get("metrics")]
    if len(good) >= 2:
        result["comparisons"] = [{"a": good[0]["target"], "b": r["target"], "sessions": r["sessions"],
                                  "rows": report.compare_runs(good[0], r)} for r in good[1:]]
    table = report.markdown_table(good)
    spec_lines = [f"- {r['target']} (S={r.get('sessions')}): {format_spec(r['speculation'])}"
                  for r in good if r.get("speculation")]
    if spec_lines:
        table += "\n\nSpeculative decoding (server counters over the run):\n" + "\n".join(spec_lines)
    print(table)
    for c in result.get("comparisons", []):
        print(f"\n{c['b']} vs {c['a']}:\n" + report.format_compare(c["rows"], c["a"], c["b"]))
    if args.json:
        report.write_json(result, args.json)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n", encoding="utf-8")
    if args.plots and good:
        for path in report.write_plots(good, args.plots):
            print(f"[bench] wrote {path}", file=sys.stderr)
    return 0 if good and all(r["metrics"].get("completed_requests") for r in good) else 1


def compare_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="tokenfactory bench compare",
                                description="Print B/A ratios of two bench results (or of two runs in one file).")
    p.add_argument("a")
    p.add_argument("b", nargs="?")
    p.add_argument("--a-run", type=int, default=0, help="which run of A (index)")
    p.add_argument("--b-run", type=int, default=None, help="which run of B (default: 0, or 1 if B is A)")
    args = p.parse_args(argv)
    try:
        da = report.load_json(args.a)
        db = report.load_json(args.b) if args.b else da
        b_run = args.b_run if args.b_run is not None else (0 if args.b else 1)
        ra, rb = da["runs"][args.a_run], db["runs"][b_run]
    except (OSError, ValueError, KeyError, IndexError) as exc:
        print(f"error: cannot read the runs to compare: {exc}", file=sys.stderr)
        return 2
    print(report.format_compare(report.compare_runs(ra, rb), ra["target"], rb["target"]))
    return 0


def build_model_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="tokenfactory bench build-model")
    p.add_argument("--size", choices=["100m", "tiny"], default="100m")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from tokenfactory.bench.checkpoint import build_bench_checkpoint
    print(build_bench_checkpoint(args.size, args.dtype, args.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        return compare_main(argv[1:])
    if argv and argv[0] == "build-model":
        return build_model_main(argv[1:])
    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main())
