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


# Series that appear only when the engine has what they count.
TIER_SERIES = ("vllm:external_prefix_cache_queries", "vllm:external_prefix_cache_hits",
               "tokenfactory_prefix_cache_tier_hits", "tokenfactory_kv_connector_queries")
SPEC_COUNTERS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")


def test_tier_and_speculation_series_only_when_the_engine_has_them(gw_server):
    families = scrape(gw_server.base_url)
    assert not gw_server.engine.has_kv_connector and not gw_server.engine.spec_decode_stats()
    absent = [*TIER_SERIES, *(f"vllm:spec_decode_{c}" for c in SPEC_COUNTERS),
              *(f"tokenfactory_spec_decode_{c}" for c in SPEC_COUNTERS)]
    assert not [name for name in absent if name in families]


class _TierWithEverything:
    """A second KV tier that holds every block asked of it (a warehouse after a long day).
    Page contents do not matter to the scripted executor, which reads no KV."""

    def lookup(self, block_hashes):
        return len(block_hashes)

    def load(self, block_hashes, block_ids, token_ids_per_block=None):
        return len(block_ids)

    def save(self, block_hashes, block_ids, token_ids_per_block, parent_hash=None):
        pass

    def retain(self, block_hashes, ttl_seconds):
        pass


def _scrape_collectors(engine) -> dict:
    from tokenfactory.api.metrics import Metrics
    metrics = Metrics(engine)
    register_gateway_metrics(metrics, engine, MODEL)
    return {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}


def _sample(families, name, **labels) -> float:
    return next(s.value for s in families[name].samples
                if s.name.endswith("_total") and all(s.labels.get(k) == v
                                                     for k, v in labels.items()))


def test_prefix_cache_hits_by_tier_with_a_connector(tokenizer):
    """RAM and connector hits as the KV manager counts them, under our names and vLLM's."""
    pytest.importorskip("tokenfactory.engine.kv_connector")   # H2's connector seam
    from tests.live import BLOCK_SIZE, FakeClock
    from tokenfactory.engine.async_engine import AsyncEngine
    from tokenfactory.engine.core import EngineConfig, EngineCore
    from tokenfactory.engine.executor import ScriptedExecutor
    from tokenfactory.engine.sampling_params import SamplingParams
    eos = min(tokenizer.eos_token_ids)
    executor = ScriptedExecutor(lambda state: [5, 6, 7], fallback_token=eos)
    core = EngineCore(executor, EngineConfig(block_size=BLOCK_SIZE, num_kv_blocks=64),
                      model_max_len=1024, tokenizer=tokenizer, eos_token_ids=[eos],
                      clock=FakeClock(), kv_connector=_TierWithEverything())
    engine = AsyncEngine(core)   # not started: driven step by step below
    prompt = tokenizer.encode("a prompt long enough for a few pages " * 6)
    for rid in ("first", "second"):   # the second finds the first's pages in RAM
        core.add_request(rid, prompt, SamplingParams(max_tokens=4))
        while core.has_unfinished_requests():
            core.step()
    kv = core.kv.stats()
    assert engine.has_kv_connector and kv.connector_hits > 0
    assert kv.prefix_hits > kv.connector_hits              # the second request hit RAM
    families = _scrape_collectors(engine)
    assert _sample(families, "tokenfactory_prefix_cache_tier_hits", tier="warehouse") \
        == kv.connector_hits
    assert _sample(families, "tokenfactory_prefix_cache_tier_hits", tier="ram") \
        == kv.prefix_hits - kv.connector_hits
    assert _sample(families, "tokenfactory_kv_connector_queries") == kv.connector_queries
    assert _sample(families, "vllm:external_prefix_cache_hits") == kv.connector_hits
    assert _sample(families, "vllm:external_prefix_cache_queries") == kv.connector_queries
    assert _sample(families, "vllm:prefix_cache_hits") == kv.prefix_hits - kv.connector_hits
    assert _sample(families, "vllm:prefix_cache_queries") == kv.prefix_queries


def test_speculative_decoding_counters_per_proposer(gw_server):
    """``EngineCore.spec_stats`` (per proposer name) as tokenfactory_spec_decode_*{proposer}
    and, summed, as vLLM's spec_decode series; the bench's reader (bench/targets.py) reads
    ours back."""
    from types import SimpleNamespace

    from tokenfactory.bench.targets import parse_spec_counters
    core = gw_server.core
    had = hasattr(core, "spec_stats")
    before = getattr(core, "spec_stats", None)
    # the counters EngineCore keeps while speculating (its proposers are not wired to the
    # scripted executor), set on this engine for the scrape
    core.spec_stats = {
        "ngram": SimpleNamespace(num_drafts=7, num_draft_tokens=21, num_accepted_tokens=12),
        "draft": SimpleNamespace(num_drafts=2, num_draft_tokens=8, num_accepted_tokens=5)}
    try:
        text = httpx.get(gw_server.base_url + "/metrics", timeout=10).text
    finally:
        if had:
            core.spec_stats = before
        else:
            del core.spec_stats
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for counter, ngram, draft in zip(SPEC_COUNTERS, (7, 21, 12), (2, 8, 5)):
        ours = f"tokenfactory_spec_decode_{counter}"
        assert families[ours].type == "counter"
        assert _sample(families, ours, proposer="ngram") == ngram
        assert _sample(families, ours, proposer="draft") == draft
        theirs = families[f"vllm:spec_decode_{counter}"]
        assert theirs.type == "counter"
        assert [(s.labels, s.value) for s in theirs.samples if s.name.endswith("_total")] \
            == [({"model_name": MODEL, "engine": "0"}, ngram + draft)]
    assert parse_spec_counters(text) == {"num_drafts": 9, "num_draft_tokens": 29,
                                         "num_accepted_tokens": 17}
