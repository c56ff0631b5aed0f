"""The vLLM-named series a Kubernetes inference gateway reads, checked against the published list.

The protocol list below is copied (names and types only) from the Gateway API Inference
Extension's model server protocol,
https://github.com/kubernetes-sigs/gateway-api-inference-extension/blob/main/docs/proposals/003-model-server-protocol/README.md
(table "Metrics Reporting", column "vLLM metric"), and the further names and types from vLLM's
own Prometheus logger,
https://github.com/vllm-project/vllm/blob/main/vllm/v1/metrics/loggers.py (PrometheusStatLogger:
labelnames = ["model_name", "engine"]). The exposition is parsed with prometheus_client's own
text parser, not with anything written here.
"""
from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.live import HEADERS, live_server
from tokenfactory.api.gateway_metrics import register_gateway_metrics

# Model server protocol (gateway-api-inference-extension): what the endpoint picker scrapes.
PROTOCOL = {
    "vllm:num_requests_waiting": "gauge",     # TotalQueuedRequests
    "vllm:num_requests_running": "gauge",     # TotalRunningRequests
    "vllm:kv_cache_usage_perc": "gauge",      # KVCacheUtilization (0..1)
    "vllm:cache_config_info": "gauge",        # [Optional] BlockSize / NumGPUBlocks (labels)
}
# vLLM v1 PrometheusStatLogger (vllm/v1/metrics/loggers.py): prefix cache and latency series.
VLLM = {
    "vllm:gpu_cache_usage_perc": "gauge",     # deprecated alias older EPP releases read
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
}
MODEL = "tf-gateway"


def scrape(base_url: str) -> dict:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    return {f.name: f for f in text_string_to_metric_families(text)}


@pytest.fixture(scope="module")
def gw_server(tokenizer):
    with live_server(tokenizer, served_model_name=MODEL) as s:
        ctx = s.app.state.ctx
        collector = register_gateway_metrics(ctx.metrics, s.engine, MODEL)
        assert register_gateway_metrics(ctx.metrics, s.engine, MODEL) is collector
        # the same long prompt twice: the second finds the first's pages in the prefix cache
        prompt = "shared system prompt " * 40 + "[[reply:hello]]"
        for _ in range(2):
            r = httpx.post(s.base_url + "/v1/messages", headers=HEADERS, timeout=30, json={
                "model": MODEL, "max_tokens": 16,
                "messages": [{"role": "user", "content": prompt}]})
            assert r.status_code == 200, r.text
        s.wait_idle()
        yield s


def test_names_types_and_labels_follow_the_published_lists(gw_server):
    families = scrape(gw_server.base_url)
    for name, kind in {**PROTOCOL, **VLLM}.items():
        assert name in families, f"{name} missing from /metrics"
        fam = families[name]
        assert fam.type == kind, f"{name}: {fam.type}, expected {kind}"
        assert fam.samples, f"{name} has no samples"
        for sample in fam.samples:
            assert sample.labels.get("model_name") == MODEL, sample
            assert sample.labels.get("engine") == "0", sample
    info = families["vllm:cache_config_info"].samples[0]
    assert info.labels["block_size"] == str(gw_server.core.config.block_size)
    assert info.labels["num_gpu_blocks"] == str(gw_server.core.kv.num_blocks)
    # counters are exposed with vLLM's _total suffix
    names = [s.name for s in families["vllm:prefix_cache_hits"].samples]
    assert names == ["vllm:prefix_cache_hits_total"]
    text = httpx.get(gw_server.base_url + "/metrics", timeout=10).text
    assert text.count("\nvllm:num_requests_running{") == 1   # registering twice adds nothing


def test_values_mean_what_vllm_means(gw_server):
    families = scrape(gw_server.base_url)

    def value(name, sample_name=None):
        return next(s.value for s in families[name].samples
                    if sample_name is None or s.name == sample_name)

    assert value("vllm:num_requests_running") == 0
    assert value("vllm:num_requests_waiting") == 0
    usage = value("vllm:kv_cache_usage_perc")
    assert 0.0 <= usage <= 1.0
    assert usage == value("vllm:gpu_cache_usage_perc")
    stats = gw_server.engine.stats()
    assert value("vllm:prefix_cache_queries") == stats.prefix_cache_queries > 0
    assert value("vllm:prefix_cache_hits") == stats.prefix_cache_hits > 0
    # the histograms mirror ours: same count and sum as tokenfactory_*
    for ours, theirs in (("tokenfactory_time_to_first_token_seconds",
                          "vllm:time_to_first_token_seconds"),
                         ("tokenfactory_inter_token_latency_seconds",
                          "vllm:inter_token_latency_seconds")):
        for suffix in ("_count", "_sum"):
            assert value(ours, ours + suffix) == value(theirs, theirs + suffix)
    assert value("vllm:time_to_first_token_seconds",
                 "vllm:time_to_first_token_seconds_count") == 2
    assert value("vllm:generation_tokens") == value("tokenfactory_generation_tokens") > 0


def test_grafana_board_queries_only_series_we_expose(gw_server):
    """docs/grafana-dashboard.json: every series its PromQL names is in our exposition."""
    import json
    import re
    from pathlib import Path

    board = json.loads((Path(__file__).parents[2] / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    series = re.compile(r"\b(?:vllm:|tokenfactory_)[A-Za-z0-9_:]+")
    used = {name for e in exprs for name in series.findall(e)}
    text = httpx.get(gw_server.base_url + "/metrics", timeout=10).text
    exposed = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert used and used <= exposed, sorted(used - exposed)
