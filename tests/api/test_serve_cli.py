"""`tokenfactory serve` flags, and one real start-up of the CLI on the demo model."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tokenfactory.api.auth import parse_api_key
from tokenfactory.api.serve_cli import build_parser


def test_flags_parse():
    a = build_parser().parse_args([
        "--model-alias", "claude-*=m", "--api-key", "k1:alice", "--api-key", "k2",
        "--max-tokens-policy", "reject", "--max-output-tokens", "99", "--kv-cache-memory", "1.5G",
        "--strip-system-prefix", "^x-anthropic-billing-header:.*$", "--no-prefix-caching"])
    assert a.model_alias == [("claude-*", "m")] and a.max_tokens_policy == "reject"
    assert a.kv_cache_memory == int(1.5 * 2**30) and a.no_prefix_caching
    assert a.min_cache_tokens == 1024 and a.host == "127.0.0.1" and a.kv_cache_dtype == "auto"
    assert build_parser().parse_args(["--kv-cache-dtype", "int8"]).kv_cache_dtype == "int8"
    assert parse_api_key("k1:alice") == ("k1", "alice")
    key, tenant = parse_api_key("k2")
    assert key == "k2" and tenant.startswith("key-") and "k2" not in tenant
    for bad in (["--model-alias", "nopattern"], ["--strip-system-prefix", "("],
                ["--max-tokens-policy", "maybe"], ["--kv-cache-dtype", "fp16"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_starts_says_random_and_stops_cleanly(tmp_path):
    port = _free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenfactory.cli", "serve", "--demo", "--port", str(port),
         "--max-model-len", "512", "--kv-cache-memory", "16M", "--api-key", "sekrit:t1",
         "--model-alias", "claude-*=tokenfactory-demo"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, open(tmp_path / "serve.log").read()
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.3)
        assert httpx.get(base + "/v1/models").status_code == 401
        models = httpx.get(base + "/v1/models", headers={"x-api-key": "sekrit"}).json()["data"]
        assert [m["id"] for m in models] == ["tokenfactory-demo", "claude-*"]
        assert models[0]["random_weights"] is True
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    text = open(tmp_path / "serve.log").read()
    assert code == 0, text
    assert "RANDOM" in text and "sekrit" not in text


def _ask(base: str, text: str, response: list | None = None) -> dict:
    r = httpx.post(base + "/v1/messages", timeout=120, json={
        "model": "tokenfactory-demo", "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": text}]})
    assert r.status_code == 200, r.text
    if response is not None:
        response.append(r)
    return r.json()


def test_kv_warehouse_flag_serves_a_prefix_after_restart(tmp_path):
    """`serve --kv-warehouse DIR`: a prompt computed by one server process is read back from
    DIR by the next one (counted as cached tokens, tier "warehouse" in /metrics), with the
    same greedy answer; `--speculative ngram` runs alongside."""
    from tests.live import ServeProcess
    prompt = "The warehouse keeps pages on disk. " * 12
    answers = []
    for run in range(2):
        server = ServeProcess(tmp_path, "--kv-warehouse", str(tmp_path / "wh"),
                              "--speculative", "ngram")
        try:
            server.wait_healthy()
            responses: list = []
            body = _ask(server.base_url, prompt, responses)
            answers.append(body["content"])
            metrics = httpx.get(server.base_url + "/metrics", timeout=10).text
            # the one request's drafts, in its headers and (the server's only request) /metrics
            head = responses[0].headers
            proposed = int(head["x-tokenfactory-spec-proposed"])
            accepted = int(head["x-tokenfactory-spec-accepted"])
            assert 0 <= accepted <= proposed
            for counter, value in (("num_draft_tokens", proposed),
                                   ("num_accepted_tokens", accepted)):
                line = next((ln for ln in metrics.splitlines() if ln.startswith(
                    f'tokenfactory_spec_decode_{counter}_total{{proposer="ngram"}}')), None)
                # (no series until the engine has drafted at all)
                assert (0.0 if line is None else float(line.split()[-1])) == value, line
        finally:
            assert server.terminate() == 0, server.log()
            server.close()
        if run == 0:
            assert body["usage"]["cache_read_input_tokens"] == 0
        else:
            assert body["usage"]["cache_read_input_tokens"] >= 64, body["usage"]
            line = next(ln for ln in metrics.splitlines()
                        if ln.startswith('tokenfactory_prefix_cache_tier_hits_total{tier="warehouse"}'))
            assert float(line.split()[-1]) == body["usage"]["cache_read_input_tokens"]
    assert answers[0] == answers[1]


def test_speculative_draft_flag_and_bad_value(tmp_path):
    """`serve --speculative draft:PATH` with the demo model as its own draft: the answer equals
    the plain server's, and what was drafted was all kept (a model agrees with itself) -
    reported per request in the headers. A value that is no proposer is a usage error."""
    from tests.live import ServeProcess
    from tokenfactory.model.demo import ensure_demo_checkpoint
    bad = subprocess.run([sys.executable, "-m", "tokenfactory.cli", "serve", "--demo",
                          "--speculative", "draft"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "ngram, suffix or draft:PATH" in bad.stderr, bad.stderr
    prompt = "one two three four five one two three four five one two three"
    answers, heads = [], []
    for args in ((), ("--speculative", f"draft:{ensure_demo_checkpoint()}")):
        server = ServeProcess(tmp_path, *args)
        try:
            server.wait_healthy()
            responses: list = []
            answers.append(_ask(server.base_url, prompt, responses)["content"])
            heads.append(responses[0].headers)
        finally:
            assert server.terminate() == 0, server.log()
            server.close()
    assert answers[0] == answers[1]
    proposed = int(heads[1]["x-tokenfactory-spec-proposed"])
    assert proposed > 0 and int(heads[1]["x-tokenfactory-spec-accepted"]) == proposed
