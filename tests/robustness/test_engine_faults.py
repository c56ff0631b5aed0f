"""Engine faults: a failing forward pass, a dead engine thread, and a SIGTERM drain.

tests/api/test_errors.py already checks that a forward pass failing at prefill is a 500
(Anthropic non-streaming, OpenAI non-streaming) or an ``event: error`` (Anthropic stream), and
the in-process engine death (500s, /health 503). Added here: failures *mid-stream* after
content was sent (both protocols), pages freed while other streams keep going, and the real
``tokenfactory serve`` process: exit non-zero when the engine dies, exit 0 after a SIGTERM drain.
"""
from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from .conftest import (HEADERS, ServeProcess, check_anthropic_stream, check_openai_error,
                      live_server, parse_sse)


def stream_text(server, path, body) -> tuple[int, str]:
    with httpx.stream("POST", server.base_url + path, json=body, headers=HEADERS,
                      timeout=60) as r:
        return r.status_code, r.read().decode()


def test_forward_pass_failure_mid_stream_anthropic(server):
    status, text = stream_text(server, "/v1/messages", {
        "model": "tf-test", "max_tokens": 200, "stream": True,
        "messages": [{"role": "user", "content": "[[fail_after:5]] [[reply:long]]"}]})
    assert status == 200
    frames = parse_sse(text)
    names = [e for e, _ in frames if e != "ping"]
    assert names[0] == "message_start" and "content_block_delta" in names
    assert names[-1] == "error" and "message_stop" not in names, names
    err = frames[-1][1]
    assert err["type"] == "error" and err["error"]["type"] == "api_error"
    assert err["error"]["message"]
    server.assert_no_leaks()


def test_forward_pass_failure_mid_stream_openai(server):
    status, text = stream_text(server, "/v1/chat/completions", {
        "model": "tf-test", "max_tokens": 200, "stream": True,
        "messages": [{"role": "user", "content": "[[fail_after:5]] [[reply:long]]"}]})
    assert status == 200
    frames = parse_sse(text)
    contents = [d for _, d in frames if isinstance(d, dict) and "choices" in d]
    assert any(c["choices"][0]["delta"].get("content") for c in contents)
    errors = [d for _, d in frames if isinstance(d, dict) and "error" in d]
    assert len(errors) == 1 and errors[0]["error"]["type"] == "server_error"
    # no chunk claimed a normal finish
    assert all(c["choices"][0]["finish_reason"] is None for c in contents)
    server.assert_no_leaks()


def test_forward_pass_failure_non_streaming_completions(server):
    r = httpx.post(server.base_url + "/v1/completions", timeout=60, json={
        "model": "tf-test", "prompt": "[[fail_after:3]] [[reply:long]]", "max_tokens": 50})
    check_openai_error(r, 500, "server_error")
    server.assert_no_leaks()


def test_failure_frees_pages_and_later_requests_are_served(server):
    """Failures interleaved with healthy streams: every healthy stream completes (a batch whose
    forward pass raises is retried chunk by chunk, and only the failing request fails), every
    page comes back, and the engine never stops."""
    results: dict[str, list] = {"ok": [], "failed": []}

    def healthy(i):
        status, text = stream_text(server, "/v1/messages", {
            "model": "tf-test", "max_tokens": 20, "stream": True,
            "messages": [{"role": "user", "content": f"{i} [[reply:long]]"}]})
        frames = parse_sse(text)
        names = [e for e, _ in frames]
        (results["failed"] if "error" in names else results["ok"]).append(frames)

    def failing(i):
        status, text = stream_text(server, "/v1/messages", {
            "model": "tf-test", "max_tokens": 50, "stream": True,
            "messages": [{"role": "user", "content": f"{i} [[fail_after:2]] [[reply:long]]"}]})
        assert "event: error" in text

    for round_ in range(3):
        threads = [threading.Thread(target=healthy, args=(f"{round_}-{i}",)) for i in range(4)]
        threads.append(threading.Thread(target=failing, args=(round_,)))
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        server.assert_no_leaks()
    # no healthy stream fails with its failing batch-mate (docs/engine.md, "Isolation")
    assert results["failed"] == [] and len(results["ok"]) == 12
    for frames in results["ok"]:
        assert check_anthropic_stream(frames)["delta"]["stop_reason"] == "max_tokens"
    assert server.engine.is_alive
    for i in range(4):
        healthy(f"after-{i}")
    assert len(results["ok"]) == 16
    server.assert_no_leaks()


@pytest.mark.slow
def test_engine_thread_death_exits_serve_process_non_zero(tmp_path):
    srv = ServeProcess(tmp_path, env={"TOKENFACTORY_FAULT_ENGINE_DIE_AFTER_STEPS": "3"})
    try:
        srv.wait_healthy()
        assert "FAULT INJECTION" in srv.log()
        health_seen = []

        # an in-flight stream: the engine dies under it after 3 steps
        with httpx.stream("POST", srv.base_url + "/v1/messages", headers=HEADERS, timeout=60,
                          json={"model": "tokenfactory-demo", "max_tokens": 16, "stream": True,
                                "messages": [{"role": "user", "content": "Hello there"}]}) as r:
            assert r.status_code == 200
            frames = parse_sse(r.read().decode())
        try:
            health_seen.append(httpx.get(srv.base_url + "/health", timeout=5).status_code)
        except httpx.HTTPError:
            health_seen.append("gone")   # the watchdog was quicker than us
        names = [e for e, _ in frames if e != "ping"]
        assert names[-1] == "error" and "message_stop" not in names, names
        assert frames[-1][1]["error"]["type"] == "api_error"
        code = srv.proc.wait(60)
    finally:
        srv.close()
    assert code != 0, srv.log()
    assert health_seen[0] in (503, "gone"), health_seen
    assert "engine thread died" in srv.log()


@pytest.mark.slow
def test_sigterm_drains_in_flight_streams_and_exits_zero(tmp_path):
    srv = ServeProcess(tmp_path, env={"TOKENFACTORY_FAULT_STEP_DELAY_SECONDS": "0.15"})
    try:
        srv.wait_healthy()
        results: list = []
        started = threading.Semaphore(0)

        def slow_stream(i):
            with httpx.stream("POST", srv.base_url + "/v1/messages", headers=HEADERS, timeout=120,
                              json={"model": "tokenfactory-demo", "max_tokens": 16,
                                    "stream": True, "messages": [
                                        {"role": "user", "content": f"Story {i}"}]}) as r:
                text = ""
                for chunk in r.iter_text():
                    if "message_start" in chunk and "message_start" not in text:
                        started.release()
                    text += chunk
                results.append((r.status_code, text))

        threads = [threading.Thread(target=slow_stream, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for _ in threads:
            assert started.acquire(timeout=60), "streams did not start"
        srv.proc.send_signal(signal.SIGTERM)
        # new work is refused while the old work drains
        refused = None
        deadline = time.monotonic() + 30
        while refused is None and time.monotonic() < deadline:
            try:
                r = httpx.post(srv.base_url + "/v1/messages", headers=HEADERS, timeout=5, json={
                    "model": "tokenfactory-demo", "max_tokens": 4,
                    "messages": [{"role": "user", "content": "late"}]})
                if r.status_code == 503:
                    refused = "503"
                else:   # the listener had not closed yet: retry
                    time.sleep(0.05)
            except httpx.TransportError:
                refused = "connection refused"
        assert refused is not None, "new requests were still admitted after SIGTERM"
        for t in threads:
            t.join(120)
        code = srv.proc.wait(60)
    finally:
        srv.close()
    assert code == 0, srv.log()
    assert len(results) == 3
    for status, text in results:
        assert status == 200
        delta = check_anthropic_stream(parse_sse(text))
        assert delta["delta"]["stop_reason"] in ("max_tokens", "end_turn")
