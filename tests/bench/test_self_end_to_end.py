"""`tokenfactory bench --target self` end to end: our server as a subprocess, 2 sessions x 2 turns."""
import json

import pytest

from tokenfactory.bench.cli import main as bench_main


@pytest.mark.parametrize("api", ["anthropic", "openai"])
def test_self_agentic_run_reports_cache_hits(tiny_model, tmp_path, api):
    out = tmp_path / "r.json"
    rc = bench_main(["--workload", "agentic", "--target", "self", "--api", api, "--model", tiny_model,
                     "--sessions", "2", "--turns", "2", "--prefix-tokens", "300", "--tool-min", "50",
                     "--tool-max", "100", "--output-tokens", "8", "--think-time", "0",
                     "--max-duration", "120", "--no-roofline", "--no-progress", "--json", str(out),
                     "--cost-per-hour", "1.0"])
    result = json.loads(out.read_text())
    run = result["runs"][0]
    assert rc == 0, run.get("error") or run["metrics"].get("errors")
    m = run["metrics"]
    assert run["target"] == "tokenfactory"
    assert m["completed_requests"] == 4 and m["failed_requests"] == 0
    assert m["completed_tasks"] == 2 and m["machine_seconds_per_task"] > 0
    assert m["cached_tokens"] > 0 and m["prefix_cache_hit_rate"] > 0
    assert m["output_tokens"] >= 4                  # every request streamed text
    assert m["ttft_p50_s"] > 0 and m["dollars_per_m_output_tokens"] > 0
    assert len(run["requests"]) == 4


def test_naive_target_runs_plain_transformers(tiny_model, tmp_path):
    import transformers  # noqa: F401 - the naive baseline needs it
    out = tmp_path / "n.json"
    rc = bench_main(["--workload", "agentic", "--target", "naive", "--model", tiny_model,
                     "--sessions", "1", "--turns", "2", "--prefix-tokens", "100", "--tool-min", "20",
                     "--tool-max", "40", "--output-tokens", "4", "--think-time", "0",
                     "--no-roofline", "--no-progress", "--json", str(out)])
    assert rc == 0
    m = json.loads(out.read_text())["runs"][0]["metrics"]
    assert m["completed_tasks"] == 1 and m["output_tokens"] == 8        # min_new_tokens: fixed length
    assert m["cached_tokens"] == 0 and m["prefix_cache_hit_rate"] == 0.0  # no reuse between requests
