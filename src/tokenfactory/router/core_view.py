"""``RouterEngine.core``: what the API layer reads from an EngineCore, answered for a fleet of
identical replicas (page geometry and limits of one replica, the shared config, step listeners
fed with the forward-pass time each replica charged to each request)."""
from __future__ import annotations

from typing import Callable, Sequence

from tokenfactory.engine.async_engine import EngineStats
from tokenfactory.router.replica import ReplicaInfo

StepListener = Callable[[float, dict[str, int]], None]


class _PoolView:
    def __init__(self, info: ReplicaInfo, fleet_stats: Callable[[], EngineStats]):
        self._fleet_stats = fleet_stats
        self.enable_prefix_caching = info.enable_prefix_caching

    def stats(self):
        """Summed over healthy replicas (engine.block_pool.PoolStats fields)."""
        from tokenfactory.engine.block_pool import PoolStats
        s = self._fleet_stats()
        return PoolStats(s.kv_blocks_total, s.kv_blocks_free, s.kv_blocks_pinned, 0,
                         s.prefix_cache_queries, s.prefix_cache_hits)


class _KVView:
    def __init__(self, info: ReplicaInfo, fleet_stats: Callable[[], EngineStats]):
        self.block_size = info.block_size
        self.num_blocks = info.num_blocks      # per replica: what one request can use
        self.pool = _PoolView(info, fleet_stats)


class _ExecutorView:
    """No weights stream through the router process (the dashboard's roofline skips it)."""

    model = None

    def __init__(self, bytes_per_block: int):
        self._bytes_per_block = bytes_per_block

    def kv_cache_bytes_per_block(self, block_size: int) -> int:
        return self._bytes_per_block


class _SchedulerView:
    requests: dict = {}      # the requests live in the replicas, not here


class RouterCoreView:
    """What the API layer reads from ``engine.core``, answered for a fleet of identical
    replicas: per-replica geometry and limits, and step listeners fed with the forward-pass
    time each replica charged to each request (streamed back beside its outputs)."""

    def __init__(self, info: ReplicaInfo, fleet_stats: Callable[[], EngineStats], tokenizer):
        self.tokenizer = tokenizer
        self.config = info.engine_config
        self.max_model_len = info.max_model_len
        self.kv = _KVView(info, fleet_stats)
        self.executor = _ExecutorView(info.kv_cache_bytes_per_block)
        self.scheduler = _SchedulerView()
        self._listeners: list[StepListener] = []

    def add_step_listener(self, fn: StepListener) -> None:
        self._listeners.append(fn)

    def remove_step_listener(self, fn: StepListener) -> None:
        self._listeners.remove(fn)

    def charge(self, request_id: str, charges: Sequence[tuple[float, int]]) -> None:
        for seconds, tokens in charges:
            for fn in self._listeners:
                fn(seconds, {request_id: tokens})
