import asyncio
import json

import pytest

from tokenfactory.bench import report
from tokenfactory.bench.cli import main as bench_main
from tokenfactory.bench.runner import run_workload
from tokenfactory.bench.targets import HttpTarget, TargetError
from tokenfactory.bench.workloads import agentic, chat


def run(target, metrics, sessions=2, requests=()):
    return {"target": target, "sessions": sessions, "metrics": metrics, "requests": list(requests)}


A = run("naive", {"ttft_p50_s": 2.0, "itl_p50_s": 0.04, "output_throughput_tps": 10.0,
                  "prefix_cache_hit_rate": 0.0, "machine_seconds_per_task": 300.0, "failed_requests": 0})
B = run("tokenfactory", {"ttft_p50_s": 0.5, "itl_p50_s": 0.05, "output_throughput_tps": 40.0,
                         "prefix_cache_hit_rate": 0.9, "machine_seconds_per_task": 20.0, "failed_requests": 0})


def test_compare_ratios():
    rows = {r["metric"]: r for r in report.compare_runs(A, B)}
    assert rows["ttft_p50_s"]["b_over_a"] == pytest.approx(0.25)
    assert rows["ttft_p50_s"]["b_better_by"] == pytest.approx(4.0)          # lower is better
    assert rows["itl_p50_s"]["b_better_by"] == pytest.approx(0.8)
    assert rows["output_throughput_tps"]["b_better_by"] == pytest.approx(4.0)   # higher is better
    assert rows["machine_seconds_per_task"]["b_better_by"] == pytest.approx(15.0)
    assert rows["prefix_cache_hit_rate"]["b_over_a"] is None                 # A is 0: no ratio
    assert rows["failed_requests"]["b_over_a"] is None
    assert rows["goodput_rps"]["a"] is None


def test_compare_cli(tmp_path, capsys):
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    report.write_json({"runs": [A]}, pa)
    report.write_json({"runs": [B]}, pb)
    assert bench_main(["compare", str(pa), str(pb)]) == 0
    out = capsys.readouterr().out
    assert "| machine_seconds_per_task | 300 | 20 | 0.06667 | 15.00x |" in out
    report.write_json({"runs": [A, B]}, pa)                  # two runs in one file
    assert bench_main(["compare", str(pa)]) == 0
    assert "15.00x" in capsys.readouterr().out
    assert bench_main(["compare", str(tmp_path / "missing.json"), str(pb)]) == 2


def test_markdown_and_plots(tmp_path):
    reqs = [{"ok": True, "t_send": 0.0, "t_first": 0.5, "t_end": 1.0, "chunk_times": [0.5, 0.7, 1.0]}]
    runs = [dict(A, requests=reqs), dict(B, requests=reqs), dict(B, sessions=4, requests=reqs)]
    table = report.markdown_table(runs)
    assert table.count("\n") == 4 and "| tokenfactory | 2 | 500 |" in table and "90.0%" in table
    paths = report.write_plots(runs, tmp_path / "agentic")
    assert [p.name for p in paths] == ["agentic_latency_cdf.png", "agentic_throughput.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_url_targets_must_be_loopback():
    with pytest.raises(TargetError, match="loopback"):
        HttpTarget("http://example.com:8000")
    HttpTarget("http://127.0.0.1:8000")
    HttpTarget("http://localhost:8000", api="openai")


class FakeTarget:
    """Answers instantly; fails the request whose turn index is in `fail_turns`."""
    name, kind = "fake", "fake"

    def __init__(self, fail_turns=()):
        self.fail_turns, self.seen = set(fail_turns), []

    async def request(self, session, messages, max_tokens, rec, clock):
        self.seen.append((session.id, len(messages)))
        await asyncio.sleep(0)
        if rec.turn in self.fail_turns:
            rec.error = "HTTP 500"
            return
        rec.t_first = rec.t_end = clock()
        rec.chunk_times = [rec.t_first]
        rec.prompt_tokens, rec.cached_tokens, rec.output_tokens = 10, 5, max_tokens
        rec.ok, rec.text = True, "answer"


def test_runner_closed_loop_bounds_and_failures():
    w = agentic(seed=0, sessions=3, turns=3, prefix_tokens=100, tool_min=10, tool_max=20, think_time=0.0)
    t = FakeTarget()
    recs, _ = asyncio.run(run_workload(w, t, progress=False))
    assert len(recs) == 9 and all(r.ok for r in recs)
    # every turn sends the whole history: 1, 3, 5 messages
    assert sorted(n for _, n in t.seen) == [1, 1, 1, 3, 3, 3, 5, 5, 5]
    recs, _ = asyncio.run(run_workload(w, FakeTarget(), max_requests=4, progress=False))
    assert len(recs) == 4
    recs, _ = asyncio.run(run_workload(w, FakeTarget(fail_turns={1}), progress=False))
    assert len(recs) == 6 and sum(not r.ok for r in recs) == 3   # a session stops at its failure


def test_runner_open_loop_arrivals():
    w = chat(seed=0, requests=5, rate=0.0)
    recs, _ = asyncio.run(run_workload(w, FakeTarget(), progress=False))
    assert len(recs) == 5 and {r.turn for r in recs} == {0}


def test_bench_cli_writes_trace_and_reports_target_errors(tmp_path, capsys):
    trace = tmp_path / "w.jsonl"
    rc = bench_main(["--workload", "chat", "--requests", "3", "--target", "http://127.0.0.1:9",
                     "--write-trace", str(trace), "--no-roofline", "--no-progress",
                     "--json", str(tmp_path / "r.json")])
    assert rc == 1                                   # nothing listens on port 9: all requests fail
    assert len(trace.read_text().splitlines()) == 4
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["runs"][0]["metrics"]["failed_requests"] == 3
    assert result["workload"]["requests"] == 3
