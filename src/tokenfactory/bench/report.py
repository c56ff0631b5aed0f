"""Reports: the JSON result file, a markdown table and PNG plots (latency CDFs, throughput vs
concurrency)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from tokenfactory.bench import metrics as M

# (key, label, scale, format) for the markdown table; scale turns seconds into ms etc.
TABLE = [
    ("ttft_p50_s", "TTFT p50 (ms)", 1e3, "{:.0f}"), ("ttft_p99_s", "TTFT p99 (ms)", 1e3, "{:.0f}"),
    ("itl_p50_s", "ITL p50 (ms)", 1e3, "{:.1f}"), ("itl_p99_s", "ITL p99 (ms)", 1e3, "{:.1f}"),
    ("e2e_p50_s", "E2E p50 (s)", 1, "{:.2f}"),
    ("request_throughput_rps", "req/s", 1, "{:.3f}"), ("output_throughput_tps", "out tok/s", 1, "{:.1f}"),
    ("goodput_rps", "goodput req/s", 1, "{:.3f}"),
    ("prefix_cache_hit_rate", "cache hit", 100, "{:.1f}%"),
    ("failed_requests", "failed", 1, "{:.0f}"),
    ("machine_seconds_per_task", "machine-s/task", 1, "{:.1f}"),
    ("dollars_per_m_output_tokens", "$/M out tok", 1, "{:.2f}"),
]


def _fmt(value: Any, scale: float, fmt: str) -> str:
    if value is None:
        return "–"
    try:
        return fmt.format(value * scale)
    except (TypeError, ValueError):
        return str(value)


def markdown_table(runs: Sequence[dict]) -> str:
    head = ["target", "sessions"] + [label for _, label, _, _ in TABLE] + ["decode eff", "prefill eff"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        m, eff = run["metrics"], run.get("efficiency", {})
        row = [run["target"], str(run.get("sessions", ""))]
        row += [_fmt(m.get(k), s, f) for k, _, s, f in TABLE]
        row += [_fmt(eff.get("decode_efficiency"), 100, "{:.1f}%"), _fmt(eff.get("prefill_efficiency"), 100, "{:.1f}%")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")


def load_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _cdf(ax, values: list[float], label: str) -> None:
    if not values:
        return
    v = sorted(values)
    ax.plot(v, [(i + 1) / len(v) for i in range(len(v))], label=label, drawstyle="steps-post")


def write_plots(runs: Sequence[dict], out_prefix: str | Path) -> list[Path]:
    """<prefix>_latency_cdf.png (TTFT, ITL, E2E per target) and <prefix>_throughput.png
    (output tok/s against concurrent sessions, one line per target)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefix = Path(out_prefix)
    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for run in runs:
        label = f"{run['target']} (S={run.get('sessions', '?')})"
        reqs = [r for r in run.get("requests", []) if r.get("ok")]
        _cdf(axes[0], [r["t_first"] - r["t_send"] for r in reqs], label)
        _cdf(axes[1], [b - a for r in reqs for a, b in zip(r["chunk_times"], r["chunk_times"][1:])], label)
        _cdf(axes[2], [r["t_end"] - r["t_send"] for r in reqs], label)
    for ax, title in zip(axes, ["TTFT (s)", "inter-token latency (s)", "end-to-end latency (s)"]):
        ax.set_xlabel(title)
        ax.set_ylabel("fraction of requests")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(prefix.with_name(prefix.name + "_latency_cdf.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    by_target: dict[str, list[tuple[int, float]]] = {}
    for run in runs:
        by_target.setdefault(run["target"], []).append(
            (int(run.get("sessions") or 0), run["metrics"].get("output_throughput_tps") or 0.0))
    for target, pts in by_target.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=target)
    ax.set_xlabel("concurrent sessions")
    ax.set_ylabel("output tokens/s")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(prefix.with_name(prefix.name + "_throughput.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


# ---------------------------------------------------------------------------- compare

COMPARE_KEYS = [
    ("ttft_p50_s", "lower"), ("ttft_p90_s", "lower"), ("ttft_p99_s", "lower"),
    ("itl_p50_s", "lower"), ("itl_p99_s", "lower"), ("tpot_p50_s", "lower"), ("e2e_p50_s", "lower"),
    ("request_throughput_rps", "higher"), ("output_throughput_tps", "higher"), ("goodput_rps", "higher"),
    ("prefix_cache_hit_rate", "higher"), ("machine_seconds_per_task", "lower"),
    ("dollars_per_m_output_tokens", "lower"), ("failed_requests", "lower"),
]


def compare_runs(a: dict, b: dict) -> list[dict]:
    """Per metric: A, B, B/A and how many times better B is than A (>1 means B is better)."""
    rows = []
    for key, better in COMPARE_KEYS:
        va, vb = a["metrics"].get(key), b["metrics"].get(key)
        ratio = vb / va if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and va else None
        gain = None
        if ratio is not None and ratio > 0:
            gain = 1 / ratio if better == "lower" else ratio
        rows.append({"metric": key, "a": va, "b": vb, "b_over_a": ratio, "b_better_by": gain})
    return rows


def format_compare(rows: list[dict], name_a: str, name_b: str) -> str:
    def f(x: Any) -> str:
        if x is None:
            return "–"
        return f"{x:.4g}" if isinstance(x, float) else str(x)
    lines = [f"| metric | A: {name_a} | B: {name_b} | B/A | B better by |", "|---|---|---|---|---|"]
    for r in rows:
        gain = "–" if r["b_better_by"] is None else f"{r['b_better_by']:.2f}x"
        lines.append(f"| {r['metric']} | {f(r['a'])} | {f(r['b'])} | {f(r['b_over_a'])} | {gain} |")
    return "\n".join(lines)


def records_to_dicts(records) -> list[dict]:
    from dataclasses import asdict
    out = []
    for r in records:
        d = asdict(r)
        d["text"] = d["text"][:80]
        out.append(d)
    return out


__all__ = ["markdown_table", "write_json", "load_json", "write_plots", "compare_runs", "format_compare",
           "records_to_dicts", "M"]
