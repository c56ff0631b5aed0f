"""`tokenfactory serve --replicas 2` as a real process (demo model, its own local Ray runtime):
the Anthropic API through the router, /health with the replica count, /metrics with a
`replica` label per replica, one token warehouse shared by both replicas (a prompt computed on
one is read from disk by the other), and a clean exit on SIGTERM."""
from __future__ import annotations

import time

import httpx
import pytest

pytest.importorskip("ray")


def test_serve_with_two_replicas_answers_and_reports_each_replica(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    from tests.live import ServeProcess

    warehouse = tmp_path / "warehouse"
    server = ServeProcess(tmp_path, "--replicas", "2", "--router", "round-robin",
                          "--kv-warehouse", str(warehouse))
    try:
        server.wait_healthy(timeout=300)
        health = httpx.get(server.base_url + "/health", timeout=10).json()
        assert health == {"status": "ok", "replicas_healthy": 2, "replicas": 2}
        for text in ("first question", "second question"):
            r = httpx.post(server.base_url + "/v1/messages", timeout=120, json={
                "model": "tokenfactory-demo", "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": text}]})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["output_tokens"] >= 1
        # round-robin: replica 0 computes this prompt, replica 1 (never saw it) reads it back
        body = {"model": "tokenfactory-demo", "max_tokens": 2, "temperature": 0,
                "messages": [{"role": "user", "content": " ".join(["warehouse"] * 40)}]}
        first = httpx.post(server.base_url + "/v1/messages", timeout=120, json=body)
        assert first.status_code == 200, first.text
        assert first.json()["usage"]["cache_read_input_tokens"] == 0
        deadline = time.monotonic() + 60
        while not any(p.is_file() for p in warehouse.rglob("*")):   # written in the background
            assert time.monotonic() < deadline, "replica 0 wrote no page to the warehouse"
            time.sleep(0.2)
        time.sleep(1.0)   # the rest of the prompt's pages
        second = httpx.post(server.base_url + "/v1/messages", timeout=120, json=body)
        assert second.status_code == 200, second.text
        assert second.json()["usage"]["cache_read_input_tokens"] > 0, second.json()["usage"]
        metrics = httpx.get(server.base_url + "/metrics", timeout=10).text
    finally:
        code = server.terminate()
        server.close()
    assert code == 0, server.log()
    routed = {s.labels["replica"]: s.value
              for f in text_string_to_metric_families(metrics)
              if f.name == "tokenfactory_replica_requests_routed"
              for s in f.samples if s.name.endswith("_total")}
    assert routed == {"0": 2.0, "1": 2.0}       # round-robin: alternating
