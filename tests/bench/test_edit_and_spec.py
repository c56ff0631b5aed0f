"""The "edit a file" workload and the speculative-decoding figures in bench reports."""
import asyncio
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from tokenfactory.bench.cli import _parser, format_spec, make_workload
from tokenfactory.bench.cli import main as bench_main
from tokenfactory.bench.targets import HttpTarget, parse_spec_counters, spec_summary
from tokenfactory.bench.workloads import _stdlib_source, edit


@pytest.fixture(scope="module")
def smollm_tokenizer():
    from tokenfactory.model.default import default_model_path
    from tokenfactory.text.tokenizer import Tokenizer
    return Tokenizer.from_gguf(default_model_path())


def test_edit_prompts_hold_a_real_file_of_the_requested_size(smollm_tokenizer):
    w = edit(seed=0, requests=6)
    assert w.name == "edit" and w.max_concurrency == 1 and len(w.sessions) == 6
    for s in w.sessions:
        (turn,) = s.turns
        body = re.search(r"```python\n(.*)\n```\n\nMake one change", turn.user, re.S).group(1)
        n = len(smollm_tokenizer.encode(body))
        assert 700 <= n <= 3600, n                       # 1-3K tokens on the real tokenizer
        # room for the whole file back (plus the fence and the change), not far more
        assert n + 16 <= turn.max_tokens <= 1.4 * n + 64, (n, turn.max_tokens)
        old = re.search(r"rename the function `(\w+)` to `\1_v2`", turn.user).group(1)
        assert f"def {old}(" in body
        name = re.search(r"the file `(\w+)\.py`", turn.user).group(1)
        assert _stdlib_source(name).startswith(body + "\n")   # a real file, cut after a line
    assert len({s.turns[0].user for s in w.sessions}) > 1


def test_cli_builds_edit_workload():
    args = _parser().parse_args(["--workload", "edit", "--requests", "3", "--concurrency", "8",
                                 "--file-min-tokens", "500", "--file-max-tokens", "600",
                                 "--output-tokens", "32"])
    w = make_workload(args, 1.3, 0.25)
    assert w.max_concurrency == 8 and len(w.sessions) == 3
    assert w.params["file_max"] == 600 and w.params["tokens_per_char"] == 0.25
    assert all(s.turns[0].max_tokens == 32 for s in w.sessions)


def _exposition(drafts: dict[str, int], proposed: dict[str, int], accepted: dict[str, int]) -> str:
    """What a server built on prometheus_client exposes for per-proposer counters."""
    reg = CollectorRegistry()
    families = {}
    for key, values in (("num_drafts", drafts), ("num_draft_tokens", proposed),
                        ("num_accepted_tokens", accepted)):
        families[key] = Counter(f"tokenfactory_spec_decode_{key}", key, ["proposer"],
                                registry=reg)
        for proposer, v in values.items():
            families[key].labels(proposer=proposer).inc(v)
    Counter("tokenfactory_requests", "unrelated", registry=reg).inc(5)
    return generate_latest(reg).decode()


def test_spec_counters_parse_and_summarize():
    before = parse_spec_counters(_exposition({"ngram": 2}, {"ngram": 10}, {"ngram": 4}))
    assert before == {"num_drafts": 2, "num_draft_tokens": 10, "num_accepted_tokens": 4}
    after = parse_spec_counters(_exposition({"ngram": 12, "suffix": 10}, {"ngram": 60, "suffix": 40},
                                            {"ngram": 44, "suffix": 20}))
    s = spec_summary(before, after)
    assert s["num_drafts"] == 20 and s["num_draft_tokens"] == 90 and s["num_accepted_tokens"] == 60
    assert s["acceptance_rate"] == pytest.approx(60 / 90)
    assert s["mean_accepted_length"] == pytest.approx(1 + 60 / 20)
    assert "66.7%" in format_spec(s) and "4.00 tokens/step" in format_spec(s)
    assert spec_summary({}, {}) == {} and spec_summary(before, before) == {}
    assert parse_spec_counters("tokenfactory_spec_decode_num_drafts_total 7\n") == {"num_drafts": 7}
    assert parse_spec_counters("{{{ not prometheus") == {}


class _Metrics(BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):  # noqa: N802 - http.server's name
        ok = self.path == "/metrics"
        self.send_response(200 if ok else 404)
        self.end_headers()
        self.wfile.write(self.body if ok else b"")

    def log_message(self, *args):
        pass


def test_http_target_reads_metrics_endpoint():
    _Metrics.body = _exposition({"suffix": 3}, {"suffix": 12}, {"suffix": 9}).encode()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        async def read():
            t = HttpTarget(f"http://127.0.0.1:{server.server_port}")
            await t.start()
            try:
                return await t.spec_counters()
            finally:
                await t.stop()
        assert asyncio.run(read()) == {"num_drafts": 3, "num_draft_tokens": 12,
                                       "num_accepted_tokens": 9}
    finally:
        server.shutdown()
        server.server_close()


def test_self_edit_run(tiny_model, tmp_path):
    """`--workload edit` through our server end to end (without speculation the server reports
    no counters, so the run has no speculation figures)."""
    out = tmp_path / "e.json"
    rc = bench_main(["--workload", "edit", "--target", "self", "--model", tiny_model,
                     "--requests", "1", "--file-min-tokens", "60", "--file-max-tokens", "80",
                     "--output-tokens", "4", "--no-roofline", "--no-progress", "--json", str(out)])
    run = json.loads(out.read_text())["runs"][0]
    assert rc == 0, run.get("error") or run["metrics"].get("errors")
    assert run["metrics"]["completed_requests"] == 1 and run["speculation"] == {}
