"""The metric names Kubernetes inference gateways read from vLLM, served next to ours.

The Gateway API Inference Extension's endpoint picker (EPP) and llm-d score model servers by
scraping Prometheus: its "model server protocol" (docs/proposals/003-model-server-protocol in
kubernetes-sigs/gateway-api-inference-extension) names, by their vLLM spelling,
``vllm:num_requests_waiting`` (gauge), ``vllm:num_requests_running`` (gauge),
``vllm:kv_cache_usage_perc`` (gauge, 0..1) and, optionally, ``vllm:cache_config_info``
(labels ``block_size`` and ``num_gpu_blocks``, for its prefix-cache scorer). Exposing those
names with vLLM's meanings lets an existing gateway route to tokenfactory unchanged.

Besides those, the series Grafana boards and llm-d dashboards chart, as vLLM's v1 metrics
logger (vllm/v1/metrics/loggers.py) declares them: prefix-cache queries/hits (counters of
tokens; with a KV connector, its tier as ``vllm:external_prefix_cache_*``), speculative
decoding counters (``vllm:spec_decode_*``, when the engine speculates), prompt/generation token
counters and the TTFT, inter-token-latency and end-to-end histograms. Every series carries vLLM's labels ``model_name`` (the served model name) and
``engine`` (the engine index, always "0" here: one engine per process).

Nothing is counted twice: this collector reads ``AsyncEngine.stats()`` at scrape time and
mirrors the histograms/counters of ``api.metrics.Metrics`` under the vLLM names (same
observations, our bucket bounds), so the two views can never disagree.
"""
from __future__ import annotations

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)

LABELS = ("model_name", "engine")


def _samples(metric) -> list:
    """The samples of one prometheus_client metric object (a Counter or a Histogram)."""
    return [s for family in metric.collect() for s in family.samples]


def _counter_value(counter) -> float:
    return next((s.value for s in _samples(counter) if s.name.endswith("_total")), 0.0)


def _histogram_parts(hist) -> tuple[list[tuple[str, float]], float]:
    """(cumulative buckets as (le, count) including +Inf, sum) of an unlabelled Histogram."""
    buckets, total = [], 0.0
    for s in _samples(hist):
        if s.name.endswith("_bucket"):
            buckets.append((s.labels["le"], s.value))
        elif s.name.endswith("_sum"):
            total = s.value
    return buckets, total


class GatewayCollector:
    """Scrape-time collector; register it on ``Metrics.registry``."""

    def __init__(self, metrics, engine, model_name: str, engine_index: str = "0"):
        self.metrics = metrics
        self.engine = engine
        self.labels = [model_name, engine_index]
        config = engine.core.config
        self.block_size = config.block_size
        self.prefix_caching = config.enable_prefix_caching

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=LABELS)
        g.add_metric(self.labels, value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc, labels=LABELS)
        c.add_metric(self.labels, value)
        return c

    def _histogram(self, name: str, doc: str, source) -> HistogramMetricFamily:
        h = HistogramMetricFamily(name, doc, labels=LABELS)
        buckets, total = _histogram_parts(source)
        h.add_metric(self.labels, buckets, sum_value=total)
        return h

    def collect(self):
        s = self.engine.stats()
        # In use = held by a request, or pinned by a cache_control TTL: neither can be handed
        # to a new request, which is what a gateway asks this gauge ("how full is it?").
        in_use = s.kv_blocks_total - s.kv_blocks_free + s.kv_blocks_pinned
        usage = in_use / s.kv_blocks_total if s.kv_blocks_total else 0.0
        yield self._gauge("vllm:num_requests_running",
                          "Number of requests in model execution batches.", s.num_running)
        yield self._gauge("vllm:num_requests_waiting",
                          "Number of requests waiting to be processed.", s.num_waiting)
        yield self._gauge("vllm:kv_cache_usage_perc",
                          "KV-cache usage. 1 means 100 percent usage.", usage)
        # The name vLLM used before 0.9 and older EPP releases still read.
        yield self._gauge("vllm:gpu_cache_usage_perc",
                          "KV-cache usage. 1 means 100 percent usage. "
                          "DEPRECATED: Use vllm:kv_cache_usage_perc instead.", usage)
        yield self._counter("vllm:prefix_cache_queries",
                            "Prefix cache queries, in terms of number of queried tokens.",
                            s.prefix_cache_queries)
        # vLLM counts the local (here: RAM) cache's hits here and the connector's apart
        yield self._counter("vllm:prefix_cache_hits",
                            "Prefix cache hits, in terms of number of cached tokens.",
                            s.prefix_cache_hits - s.connector_hits)
        if getattr(self.engine, "has_kv_connector", False):
            yield self._counter("vllm:external_prefix_cache_queries",
                                "Prompt tokens looked up in the KV connector's tier after a "
                                "local miss.",
                                s.connector_queries)
            yield self._counter("vllm:external_prefix_cache_hits",
                                "Prompt tokens the KV connector's tier supplied.",
                                s.connector_hits)
        spec_fn = getattr(self.engine, "spec_decode_stats", None)
        spec = spec_fn() if spec_fn is not None else {}
        if spec:   # summed over proposers: vLLM runs one speculative method per engine
            for counter, doc in (
                    ("num_drafts", "Speculative steps that verified a draft."),
                    ("num_draft_tokens", "Draft tokens proposed."),
                    ("num_accepted_tokens", "Draft tokens accepted.")):
                yield self._counter(f"vllm:spec_decode_{counter}", doc,
                                    sum(getattr(c, counter) for c in spec.values()))
        info = GaugeMetricFamily("vllm:cache_config_info", "Information of the KV cache config",
                                 labels=["block_size", "num_gpu_blocks", "enable_prefix_caching",
                                         *LABELS])
        info.add_metric([str(self.block_size), str(s.kv_blocks_total),
                         str(self.prefix_caching), *self.labels], 1)
        yield info
        m = self.metrics
        yield self._counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                            _counter_value(m.prompt_tokens))
        yield self._counter("vllm:generation_tokens", "Number of generation tokens processed.",
                            _counter_value(m.generation_tokens))
        yield self._histogram("vllm:time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", m.ttft)
        yield self._histogram("vllm:inter_token_latency_seconds",
                              "Histogram of inter-token latency in seconds.", m.itl)
        yield self._histogram("vllm:e2e_request_latency_seconds",
                              "Histogram of e2e request latency in seconds.", m.e2e)


def register_gateway_metrics(metrics, engine, model_name: str) -> GatewayCollector:
    """Add the vLLM-named series to ``metrics``' registry (served by the same ``/metrics``).
    Idempotent: a second call returns the collector already registered (a registry would
    otherwise serve every series twice)."""
    existing = getattr(metrics, "gateway_collector", None)
    if existing is not None:
        return existing
    collector = GatewayCollector(metrics, engine, model_name)
    metrics.registry.register(collector)
    metrics.gateway_collector = collector
    return collector
