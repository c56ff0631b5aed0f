"""Prometheus metrics, one CollectorRegistry per app (tests build many apps in one process).

Latencies are measured where the client feels them (the HTTP layer): time to first token,
time between tokens (between deliveries: a client slower than the engine gets the tokens that
accumulated merged into one delivery, see serving.Generation), end to end. Engine state
(running / waiting requests, KV pages, prefix-cache lookups) is read from
``AsyncEngine.stats()`` at scrape time. Two families appear only when the engine has them:
prefix-cache hits by tier (``tier="ram"|"warehouse"``) when a KV connector is attached, and
speculative-decoding counters per proposer when the engine speculates. Behind the router
(``--replicas``) the unlabelled series are fleet totals and ``tokenfactory_replica_*`` series
carry a ``replica`` label: per replica, up, queue depth, KV usage and prefix-cache hit rate.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class _EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        yield GaugeMetricFamily("tokenfactory_requests_running", "Requests being computed",
                                value=s.num_running)
        yield GaugeMetricFamily("tokenfactory_requests_waiting", "Requests queued for admission",
                                value=s.num_waiting)
        yield GaugeMetricFamily("tokenfactory_kv_pages_total", "KV cache pages", value=s.kv_blocks_total)
        yield GaugeMetricFamily("tokenfactory_kv_pages_used", "KV cache pages held by requests",
                                value=s.kv_blocks_total - s.kv_blocks_free)
        yield GaugeMetricFamily("tokenfactory_kv_pages_pinned",
                                "Free KV pages retained by cache_control TTLs", value=s.kv_blocks_pinned)
        yield CounterMetricFamily("tokenfactory_prefix_cache_queries",
                                  "Prompt tokens looked up in the prefix cache",
                                  value=s.prefix_cache_queries)
        yield CounterMetricFamily("tokenfactory_prefix_cache_hits",
                                  "Prompt tokens found in the prefix cache", value=s.prefix_cache_hits)
        yield GaugeMetricFamily("tokenfactory_engine_alive", "1 while the engine thread runs",
                                value=1 if self.engine.is_alive else 0)
        if getattr(self.engine, "has_kv_connector", False):
            # only with a second tier behind the RAM prefix cache (a KV connector)
            tiers = CounterMetricFamily("tokenfactory_prefix_cache_tier_hits",
                                        "Prompt tokens found in the prefix cache, by the tier "
                                        "that held them", labels=["tier"])
            tiers.add_metric(["ram"], s.prefix_cache_hits - s.connector_hits)
            tiers.add_metric(["warehouse"], s.connector_hits)
            yield tiers
            yield CounterMetricFamily("tokenfactory_kv_connector_queries",
                                      "Prompt tokens asked of the KV connector after a RAM miss",
                                      value=s.connector_queries)
        yield from spec_decode_families(self.engine)


# ReplicaMetrics field -> (family, help, gauge?) for the per-replica series
REPLICA_SERIES = (
    ("up", "tokenfactory_replica_up", "1 while the replica serves (0: dead or hung)", True),
    ("in_flight", "tokenfactory_replica_queue_depth",
     "Requests the router has in flight on the replica", True),
    ("num_running", "tokenfactory_replica_requests_running", "Requests being computed", True),
    ("num_waiting", "tokenfactory_replica_requests_waiting", "Requests queued for admission",
     True),
    ("kv_pages_total", "tokenfactory_replica_kv_pages_total", "KV cache pages", True),
    ("kv_pages_used", "tokenfactory_replica_kv_pages_used",
     "KV cache pages held by requests or pinned by cache_control TTLs", True),
    ("kv_usage", "tokenfactory_replica_kv_usage", "KV pages in use / total (0..1)", True),
    ("prefix_cache_hit_rate", "tokenfactory_replica_prefix_cache_hit_rate",
     "Prompt tokens found cached / looked up by the replica since the router started", True),
    ("prefix_cache_queries", "tokenfactory_replica_prefix_cache_queries",
     "Prompt tokens looked up in the replica's prefix cache", False),
    ("prefix_cache_hits", "tokenfactory_replica_prefix_cache_hits",
     "Prompt tokens found in the replica's prefix cache", False),
    ("routed", "tokenfactory_replica_requests_routed", "Requests the router placed on it",
     False),
    ("deaths", "tokenfactory_replica_failures",
     "Times the router found the replica dead or hung", False),
)


class _ReplicaCollector:
    """``tokenfactory_replica_*{replica="i"}`` from ``RouterEngine.replica_metrics()``."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        rows = self.engine.replica_metrics()
        for field, name, doc, gauge in REPLICA_SERIES:
            family = (GaugeMetricFamily if gauge else CounterMetricFamily)(
                name, doc, labels=["replica"])
            for row in rows:
                family.add_metric([row.replica], float(getattr(row, field)))
            yield family
        totals = getattr(self.engine, "transfer_totals", None)
        if getattr(self.engine, "prefill_actors", None) and totals is not None:
            for name, doc, value in (
                    ("tokenfactory_kv_transfers", "Prefill -> decode KV hand-overs", totals.count),
                    ("tokenfactory_kv_transfer_tokens", "Prompt tokens whose KV pages moved "
                     "from a prefill to a decode replica", totals.tokens),
                    ("tokenfactory_kv_transfer_export_seconds", "Seconds copying those pages "
                     "out of the prefill replicas' caches", totals.export_seconds),
                    ("tokenfactory_kv_transfer_seconds", "Seconds from export done to pages in "
                     "the decode replica (the object-store hop)", totals.seconds)):
                yield CounterMetricFamily(name, doc, value=value)


# EngineCore.spec_stats counter -> help text (vLLM's meanings)
SPEC_DECODE_COUNTERS = {
    "num_drafts": "Verification steps that carried draft tokens",
    "num_draft_tokens": "Draft tokens proposed",
    "num_accepted_tokens": "Draft tokens accepted",
}


def spec_decode_families(engine):
    """``tokenfactory_spec_decode_<counter>{proposer=...}``, only when the engine speculates."""
    stats_fn = getattr(engine, "spec_decode_stats", None)
    stats = stats_fn() if stats_fn is not None else {}
    if not stats:
        return
    for counter, doc in SPEC_DECODE_COUNTERS.items():
        family = CounterMetricFamily(f"tokenfactory_spec_decode_{counter}",
                                     f"{doc}, per proposer", labels=["proposer"])
        for name, counts in sorted(stats.items()):
            family.add_metric([name], getattr(counts, counter))
        yield family


class _LedgerCollector:
    """The cost ledger's running totals: what the machine time served so far cost."""

    def __init__(self, ledger):
        self.ledger = ledger

    def collect(self):
        t = self.ledger.totals()
        yield CounterMetricFamily("tokenfactory_machine_seconds",
                                  "Forward-pass seconds charged to requests", value=t.machine_seconds)
        yield CounterMetricFamily("tokenfactory_machine_cost_dollars",
                                  "Machine seconds priced at --cost-per-hour", value=t.dollars)
        yield CounterMetricFamily("tokenfactory_energy_joules",
                                  "Machine seconds converted at --watts", value=t.joules)
        yield CounterMetricFamily("tokenfactory_api_price_dollars",
                                  "Finished requests' usage priced at the API list prices "
                                  "(cache writes 1.25x/2x, reads 0.1x)", value=t.api_dollars)


class _FrontDoorCollector:
    """What the guarded h11 protocol (frontdoor.py) turned away: attacks leave counts here
    rather than lines in the log (whose repeats are rate-limited)."""

    def __init__(self, protocol):
        self.protocol = protocol

    def collect(self):
        stats = self.protocol.stats
        yield GaugeMetricFamily("tokenfactory_connections_open", "Open HTTP connections",
                                value=len(self.protocol.live))
        yield CounterMetricFamily("tokenfactory_connections_evicted",
                                  "Connections waiting for a request head closed to make room "
                                  "under --max-connections", value=stats["evicted"])
        yield CounterMetricFamily("tokenfactory_connections_refused",
                                  "New connections answered 503: every connection was busy",
                                  value=stats["refused"])
        yield CounterMetricFamily("tokenfactory_header_timeouts",
                                  "Connections closed for not sending a request head within "
                                  "--header-timeout", value=stats["head_timeouts"])


class Metrics:
    def attach_ledger(self, ledger) -> None:
        self.registry.register(_LedgerCollector(ledger))

    def attach_kernel_choice(self, labels: dict[str, str]) -> None:
        """``tokenfactory_kernels_info{...} 1``: which CPU kernels run where, and whether that
        was measured on this CPU, read from the cache or forced (model/kernel_choice.py)."""
        if self.kernels is None:
            self.kernels = Info("tokenfactory_kernels", "CPU kernel choice (--kernels)",
                                registry=self.registry)
        self.kernels.info(labels)

    def attach_front_door(self, protocol) -> None:
        """Export the counts of a ``frontdoor.guarded_h11_protocol`` class."""
        self.registry.register(_FrontDoorCollector(protocol))

    def __init__(self, engine=None):
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("tokenfactory_time_to_first_token_seconds",
                              "Request arrival to first output token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("tokenfactory_inter_token_latency_seconds",
                             "Time between consecutive output updates of a request",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("tokenfactory_e2e_request_latency_seconds",
                             "Request arrival to last token", buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("tokenfactory_prompt_tokens", "Prompt tokens of finished requests",
                                     registry=r)
        self.cached_tokens = Counter("tokenfactory_cached_prompt_tokens",
                                     "Prompt tokens whose KV was reused from the prefix cache",
                                     registry=r)
        self.cache_creation_tokens = Counter("tokenfactory_cache_creation_tokens",
                                             "Prompt tokens written under a cache_control breakpoint",
                                             registry=r)
        self.generation_tokens = Counter("tokenfactory_generation_tokens", "Generated tokens",
                                         registry=r)
        self.requests_finished = Counter("tokenfactory_requests_finished",
                                         "Requests that completed", registry=r)
        self.requests_failed = Counter("tokenfactory_requests_failed",
                                       "Requests the engine failed or aborted", registry=r)
        self.requests_rejected = Counter("tokenfactory_requests_rejected",
                                         "Requests refused at admission (too long, queue full)",
                                         registry=r)
        self.body_timeouts = Counter("tokenfactory_body_timeouts",
                                     "Requests answered 408: the body did not arrive within "
                                     "--body-timeout", registry=r)
        self.kernels: Info | None = None
        if engine is not None:
            r.register(_EngineCollector(engine))
            if hasattr(engine, "replica_metrics"):     # replicas behind the router
                r.register(_ReplicaCollector(engine))
            executor = getattr(getattr(engine, "core", None), "executor", None)
            choice = getattr(executor, "kernel_choice", None)
            if choice is not None:
                self.attach_kernel_choice(choice.labels())

    def observe_finished(self, out, e2e_seconds: float) -> None:
        self.e2e.observe(e2e_seconds)
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.cached_tokens.inc(max(out.num_cached_tokens, 0))
        self.generation_tokens.inc(len(out.outputs[0].token_ids))
        self.requests_finished.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
