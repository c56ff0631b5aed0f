"""Turn request records into the numbers a benchmark reports.

Percentiles interpolate linearly between the two nearest ranks (numpy's default): for sorted
values v[0..n-1], p-th percentile = v[i] + (v[i+1] - v[i]) * f where p/100 * (n-1) = i + f.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from tokenfactory.bench.client import RequestRecord


def percentile(values: Sequence[float], p: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    rank = p / 100.0 * (len(v) - 1)
    i = int(rank)
    if i >= len(v) - 1:
        return float(v[-1])
    return float(v[i] + (v[i + 1] - v[i]) * (rank - i))


def ttft(r: RequestRecord) -> float:
    return r.t_first - r.t_send


def e2e(r: RequestRecord) -> float:
    return r.t_end - r.t_send


def itls(r: RequestRecord) -> list[float]:
    """Gaps between consecutive output chunks (one chunk is usually one token)."""
    return [b - a for a, b in zip(r.chunk_times, r.chunk_times[1:])]


def tpot(r: RequestRecord) -> float | None:
    """Mean time per output token after the first: (e2e - ttft) / (output_tokens - 1)."""
    n = r.output_tokens or len(r.chunk_times)
    if n < 2:
        return None
    return (r.t_end - r.t_first) / (n - 1)


def summarize(records: Sequence[RequestRecord], *, duration: float, tasks: dict[str, int],
              slo_ttft: float | None = None, slo_itl: float | None = None,
              cost_per_hour: float | None = None, machines: float = 1.0) -> dict:
    """All reported metrics for one run.

    duration: wall-clock seconds of the run (first send to last answer); the machine is assumed
    dedicated to the run, so machine-seconds = duration x machines.
    tasks: session id -> number of turns it has. A task (session) completes when all of its
    turns ran and succeeded; sessions cut short by a time or count bound do not.
    Goodput counts successful requests with TTFT <= slo_ttft and TPOT <= slo_itl (when given).
    """
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    by_session: dict[str, list[RequestRecord]] = defaultdict(list)
    for r in records:
        by_session[r.session].append(r)
    completed = [s for s, n in tasks.items() if sum(r.ok for r in by_session.get(s, [])) == n]
    ttfts = [ttft(r) for r in ok]
    e2es = [e2e(r) for r in ok]
    all_itls = [x for r in ok for x in itls(r)]
    tpots = [t for t in (tpot(r) for r in ok) if t is not None]
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    cached_tokens = sum(r.cached_tokens for r in ok)

    def good(r: RequestRecord) -> bool:
        if slo_ttft is not None and ttft(r) > slo_ttft:
            return False
        t = tpot(r)
        if slo_itl is not None and t is not None and t > slo_itl:
            return False
        return True

    good_n = sum(1 for r in ok if good(r))
    d = duration if duration > 0 else float("nan")
    m: dict = {
        "duration_s": duration,
        "requests": len(records), "completed_requests": len(ok), "failed_requests": len(failed),
        "errors": sorted({r.error or "" for r in failed})[:5],
        "tasks": len(tasks), "completed_tasks": len(completed),
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p90_s": percentile(ttfts, 90),
        "ttft_p99_s": percentile(ttfts, 99),
        "itl_p50_s": percentile(all_itls, 50), "itl_p99_s": percentile(all_itls, 99),
        "tpot_p50_s": percentile(tpots, 50),
        "e2e_p50_s": percentile(e2es, 50), "e2e_p90_s": percentile(e2es, 90), "e2e_p99_s": percentile(e2es, 99),
        "request_throughput_rps": len(ok) / d,
        "output_throughput_tps": out_tokens / d,
        "prompt_tokens": prompt_tokens, "cached_tokens": cached_tokens, "output_tokens": out_tokens,
        "prefix_cache_hit_rate": cached_tokens / prompt_tokens if prompt_tokens else 0.0,
        "slo_ttft_s": slo_ttft, "slo_itl_s": slo_itl,
        "goodput_rps": good_n / d, "goodput_fraction": good_n / len(records) if records else 0.0,
        "machine_seconds": duration * machines,
        "machine_seconds_per_task": duration * machines / len(completed) if completed else None,
    }
    if cost_per_hour is not None:
        dollars = cost_per_hour * duration * machines / 3600.0
        m["cost_per_hour"] = cost_per_hour
        m["dollars"] = dollars
        m["dollars_per_m_output_tokens"] = dollars / out_tokens * 1e6 if out_tokens else None
        m["dollars_per_m_total_tokens"] = (dollars / (out_tokens + prompt_tokens) * 1e6
                                           if out_tokens + prompt_tokens else None)
        m["dollars_per_task"] = dollars / len(completed) if completed else None
    return m
