"""`tokenfactory serve --replicas 2` as a real process (demo model, its own local Ray runtime):
the Anthropic API through the router, /health with the replica count, /metrics with a
`replica` label per replica, and a clean exit on SIGTERM."""
from __future__ import annotations

import httpx
import pytest

pytest.importorskip("ray")


def test_serve_with_two_replicas_answers_and_reports_each_replica(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    from tests.live import ServeProcess

    server = ServeProcess(tmp_path, "--replicas", "2", "--router", "round-robin")
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
        metrics = httpx.get(server.base_url + "/metrics", timeout=10).text
    finally:
        code = server.terminate()
        server.close()
    assert code == 0, server.log()
    routed = {s.labels["replica"]: s.value
              for f in text_string_to_metric_families(metrics)
              if f.name == "tokenfactory_replica_requests_routed"
              for s in f.samples if s.name.endswith("_total")}
    assert routed == {"0": 1.0, "1": 1.0}       # round-robin: one request each
