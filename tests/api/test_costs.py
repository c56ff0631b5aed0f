"""The cost ledger in the server: per-request headers, /metrics totals, extensions."""
from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def _metric(base_url: str, name: str) -> float:
    text = httpx.get(base_url + "/metrics").text
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} not in /metrics")


def test_non_streaming_responses_carry_their_cost(server):
    before = _metric(server.base_url, "tokenfactory_api_price_dollars_total")
    r = httpx.post(server.base_url + "/v1/messages", json={
        "model": "tf-test", "max_tokens": 32,
        "messages": [{"role": "user", "content": "[[reply:hello]] hi"}]})
    assert r.status_code == 200
    usage = r.json()["usage"]
    machine = float(r.headers["x-tokenfactory-machine-seconds"])
    dollars = float(r.headers["x-tokenfactory-cost-usd"])
    joules = float(r.headers["x-tokenfactory-energy-joules"])
    api = float(r.headers["x-tokenfactory-api-price-usd"])
    assert machine > 0
    ctx = server.app.state.ctx
    assert abs(dollars - machine * ctx.options.cost_per_hour / 3600) < 1e-8
    assert abs(joules - machine * ctx.options.watts) < 1e-3
    expected_api = (usage["input_tokens"] * 3.0 + usage["cache_read_input_tokens"] * 0.3
                    + usage["cache_creation_input_tokens"] * 3.75 + usage["output_tokens"] * 15.0) / 1e6
    assert abs(api - expected_api) < 1e-9
    after = _metric(server.base_url, "tokenfactory_api_price_dollars_total")
    assert abs((after - before) - api) < 1e-9
    assert _metric(server.base_url, "tokenfactory_machine_seconds_total") >= machine - 1e-6  # header rounds to µs
    server.assert_no_leaks()
    assert ctx.ledger.num_open() == 0  # every request's ledger entry is closed


def test_openai_responses_carry_their_cost(server):
    r = httpx.post(server.base_url + "/v1/chat/completions", json={
        "model": "tf-test", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and float(r.headers["x-tokenfactory-machine-seconds"]) > 0


def test_ignore_eos_and_min_tokens_extensions_on_messages(server):
    r = httpx.post(server.base_url + "/v1/messages", json={
        "model": "tf-test", "max_tokens": 20, "ignore_eos": True,
        "messages": [{"role": "user", "content": "[[reply:hello]] hi"}]})
    assert r.status_code == 200
    assert r.json()["usage"]["output_tokens"] == 20
    assert r.json()["stop_reason"] == "max_tokens"
    server.assert_no_leaks()
