"""The router's view of each replica's health, and the rules that find a hung one.

A replica can fail two ways the router must notice in bounded time:

- it dies (killed process, failed actor): its Ray calls fail with ``RayActorError`` at once;
- it hangs, alive but not working: either its process does not answer (stopped, stuck holding
  the GIL), so a poll gets no reply within ``hang_timeout``, or it answers polls but its engine
  makes no step while it has requests (``StallWatch``) for ``hang_timeout``.

A hung replica is then handled like a dead one (router/fleet.py): marked down, its index
entries dropped, its streams ended with a protocol error or, if they had produced nothing,
re-routed, and its actor killed so Ray restarts it. ``hang_timeout`` must exceed the longest
legitimate engine step (a full prefill chunk on a loaded host): 30 s by default.

Plain Python, no Ray: the rules are unit-testable (tests/router/test_policy.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from tokenfactory.engine.async_engine import EngineStats

# EngineStats fields that only grow while one engine lives; the router keeps them growing
# across a replica's restarts (Prometheus counters must not drop when a replica dies)
COUNTERS = ("prefix_cache_queries", "prefix_cache_hits", "num_steps", "connector_queries",
            "connector_hits")
GAUGES = ("num_running", "num_waiting", "kv_blocks_total", "kv_blocks_free", "kv_blocks_pinned")


@dataclass
class StallWatch:
    """Whether an engine that answers polls still makes progress: it is stalled when it has
    had requests (running or waiting) and taken no step for longer than ``timeout`` seconds."""

    timeout: float
    steps: int = -1                  # the step count last seen
    progress_at: float | None = None  # when the step count last moved (or the engine was idle)

    def reset(self) -> None:
        """A new engine (the actor restarted): forget what the old one did."""
        self.steps, self.progress_at = -1, None

    def stalled(self, stats: EngineStats, now: float) -> bool:
        busy = stats.num_running + stats.num_waiting > 0
        if not busy or stats.num_steps != self.steps or self.progress_at is None:
            self.steps, self.progress_at = stats.num_steps, now
            return False
        return now - self.progress_at > self.timeout


@dataclass
class ReplicaView:
    """The router's view of one replica (``RouterEngine.replicas``; /metrics per replica)."""

    index: int
    healthy: bool = True
    incarnation: str | None = None      # changes when Ray restarts the actor
    in_flight: int = 0                  # streams the router has open on it
    routed: int = 0                     # requests placed on it so far
    deaths: int = 0                     # times found dead or hung (streams watch this)
    stats: EngineStats | None = None    # as last polled
    error: str | None = None
    watch: StallWatch = field(default_factory=lambda: StallWatch(30.0))
    retired: set[str] = field(default_factory=set)   # incarnations found hung (killed)
    # counters of the engines this replica ran before the current one
    counter_base: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))

    def new_engine(self) -> None:
        """Ray restarted the actor: keep the old engine's counters, forget its gauges."""
        if self.stats is not None:
            for k in COUNTERS:
                self.counter_base[k] += getattr(self.stats, k)
        self.stats = None

    def lifetime_stats(self, num_blocks: int) -> EngineStats:
        """Its last polled stats with the counters summed over every engine it ran; gauges
        of a replica that is down are zero (nothing runs there, its pages are gone)."""
        s = self.stats or EngineStats(0, 0, num_blocks, num_blocks, 0, 0, 0, 0)
        s = replace(s, **{k: getattr(s, k) + self.counter_base[k] for k in COUNTERS})
        return s if self.healthy else replace(s, **dict.fromkeys(GAUGES, 0))


def add_stats(a: EngineStats, b: EngineStats) -> EngineStats:
    return EngineStats(*(getattr(a, f.name) + getattr(b, f.name) for f in fields(EngineStats)))


@dataclass
class ReplicaMetrics:
    """One replica's figures for /metrics (``replica`` label): plain data, read at scrape time
    from the replica's last poll; counters keep growing across its restarts, gauges of a
    replica that is down are zero."""

    replica: str                 # the label value: the replica's index
    up: bool
    in_flight: int               # queue depth as the router sees it: streams open on it
    routed: int                  # requests placed on it (counter)
    deaths: int                  # times it was found dead or hung (counter)
    num_running: int
    num_waiting: int
    kv_pages_total: int
    kv_pages_used: int           # held by requests or pinned by cache_control TTLs
    prefix_cache_queries: int    # prompt tokens looked up (counter, across restarts)
    prefix_cache_hits: int       # prompt tokens found cached (counter, across restarts)

    @property
    def kv_usage(self) -> float:
        return self.kv_pages_used / self.kv_pages_total if self.kv_pages_total else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries \
            if self.prefix_cache_queries else 0.0

    @classmethod
    def of(cls, view: ReplicaView, num_blocks: int) -> "ReplicaMetrics":
        s = view.lifetime_stats(num_blocks)
        return cls(str(view.index), view.healthy, view.in_flight, view.routed, view.deaths,
                   s.num_running, s.num_waiting, s.kv_blocks_total,
                   s.kv_blocks_total - s.kv_blocks_free + s.kv_blocks_pinned,
                   s.prefix_cache_queries, s.prefix_cache_hits)
