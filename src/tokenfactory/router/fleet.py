"""ReplicaFleet: the engine replicas (Ray actors) a router places requests on, kept in view.

A poller thread drains every replica's KV events and stats every ``poll_interval``: the
events feed the prefix index, the stats the fleet's figures and each replica's free pages.

Faults: a replica whose actor dies is marked unhealthy and its index entries are dropped at
once. One that hangs (no answer to a poll, or requests but no engine step, for
``hang_timeout``: router/health.py) is handled the same way and its actor killed. Ray restarts
the actor; when the poller reaches the new incarnation (a fresh engine with an empty cache)
the replica is healthy again. What happens to the requests on a replica that went down is the
router's business (router/engine.py, which builds on this class).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Sequence

from tokenfactory.engine.async_engine import EngineStats
from tokenfactory.router.health import ReplicaMetrics, ReplicaView, StallWatch, add_stats
from tokenfactory.router.index import PrefixIndex
from tokenfactory.router.policy import ReplicaState
from tokenfactory.router.replica import ReplicaInfo

log = logging.getLogger(__name__)


class ReplicaFleet:
    """The replicas, their health and the poller; ``RouterEngine`` adds the requests."""

    def __init__(self, actors: list, infos: list[ReplicaInfo], *, poll_interval: float = 0.02,
                 hang_timeout: float = 30.0, prefill_actors: Sequence = (),
                 owns_replicas: bool = True, owns_ray: bool = False):
        if not actors:
            raise ValueError("a router needs at least one replica")
        self.actors = actors
        # the smallest replica: a request it admits, every replica can (their page counts differ)
        self.info = min(infos, key=lambda i: i.num_blocks)
        self.poll_interval = poll_interval
        # A replica that does not answer a poll, or has requests and takes no step, for this
        # long is hung: handled as dead and restarted (router/health.py).
        self.hang_timeout = hang_timeout
        self.owns_replicas = owns_replicas
        # Disaggregated prefill/decode: prompts are computed on these replicas and their pages
        # moved to the decode replica (``actors``) chosen by the policy (router/disagg.py).
        # They are not polled (router/engine.py bounds their answers instead).
        self.prefill_actors = list(prefill_actors)
        self.owns_ray = owns_ray
        self.index = PrefixIndex(len(actors))
        self.replicas = [ReplicaView(i, watch=StallWatch(hang_timeout))
                         for i in range(len(actors))]
        self._polls: list[tuple | None] = [None] * len(actors)   # (ref, sent at) pending
        self._poll_lock = threading.Lock()     # one poll round at a time (a poll drains events)
        # what the routing policy reads of each replica (its index, free pages as last polled)
        self._states = [ReplicaState(self.index[i], total_pages=self.info.num_blocks,
                                     free_pages=self.info.num_blocks)
                        for i in range(len(actors))]
        self._lock = threading.Lock()          # the replica views (and the router's streams)
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll_loop, name="tokenfactory-router",
                                        daemon=True)

    # --------------------------------------------------------------- control
    def start(self) -> None:
        if not self._poller.is_alive() and not self._stop.is_set():
            self._poller.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop polling; kill the replica actors if this router owns them (``launch`` does),
        and the Ray runtime if it started it."""
        import ray

        self._stop.set()
        if self._poller.is_alive():
            self._poller.join(timeout)
        if not self.owns_replicas:
            return
        actors = self.actors + self.prefill_actors
        try:        # a clean stop first: warehouse writes still queued reach the disk
            ray.get([a.shutdown.remote() for a in actors], timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - dead or stuck replicas are killed anyway
            log.warning("replica shutdown: %s", exc)
        for actor in actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self.owns_ray:
            ray.shutdown()

    # ---------------------------------------------------------------- figures
    @property
    def has_kv_connector(self) -> bool:
        """The replicas share a disk warehouse (/metrics shows hits by tier)."""
        return bool(self.info.has_warehouse)

    @property
    def is_alive(self) -> bool:
        return any(r.healthy for r in self.replicas)

    @property
    def dead_error(self) -> str | None:
        if self.is_alive:
            return None
        return "; ".join(f"replica {r.index}: {r.error or 'down'}" for r in self.replicas)

    def health(self) -> dict:
        """``ok`` (all replicas up), ``degraded`` (some down) or ``unhealthy`` (none up)."""
        up = sum(r.healthy for r in self.replicas)
        status = "ok" if up == len(self.replicas) else "degraded" if up else "unhealthy"
        return {"status": status, "replicas_healthy": up, "replicas": len(self.replicas)}

    def stats(self) -> EngineStats:
        """Fleet totals: gauges over the replicas that are up, counters over every engine
        each replica ran (they never drop when a replica dies or restarts)."""
        total = EngineStats(0, 0, 0, 0, 0, 0, 0, 0)
        with self._lock:
            for r in self.replicas:
                total = add_stats(total, r.lifetime_stats(self.info.num_blocks))
        return total

    def replica_metrics(self) -> list[ReplicaMetrics]:
        """Per-replica figures for /metrics (api/metrics.py labels them ``replica``). A replica
        that is down reports ``up`` false and the engine figures of its last poll."""
        with self._lock:
            return [ReplicaMetrics.of(r, self.info.num_blocks) for r in self.replicas]

    # ---------------------------------------------------------------- health
    def _mark_dead(self, ri: int, exc: BaseException | str, retire: bool = False) -> None:
        """``retire``: the engine is being killed (hung): a late answer from it must not
        revive the replica (a real death needs no such guard: Ray starts a new one)."""
        view = self.replicas[ri]
        with self._lock:
            if view.healthy:
                view.deaths += 1
                log.warning("replica %d is down: %s", ri, exc)
            view.healthy = False
            view.error = str(exc)[:200]
            if retire and view.incarnation is not None:
                view.retired.add(view.incarnation)
            # the incarnation is kept: the poll tells a restarted engine (a new one) from this
            # one answering after all (then only its index entries, dropped here, are missing)
            self.index.drop_replica(ri)

    def _mark_hung(self, ri: int, reason: str) -> None:
        """A replica alive but not working: handled as dead (its streams end or re-route), and
        its actor killed so that Ray restarts it."""
        import ray

        if not self.replicas[ri].healthy:
            return
        self._mark_dead(ri, f"hung: {reason}", retire=True)
        try:
            ray.kill(self.actors[ri], no_restart=False)
        except Exception as exc:  # noqa: BLE001 - gone already; Ray restarts it or not
            log.warning("could not kill hung replica %d: %s", ri, exc)

    def poll_once(self) -> None:
        """Drain every replica's KV events and stats (the poller thread's one round). Waits up
        to ``hang_timeout`` for a healthy replica's answer (none: it is hung); a replica
        already down is only checked, its poll left pending until it is back."""
        with self._poll_lock:
            self._poll_round()

    def _poll_round(self) -> None:
        import ray
        from ray.exceptions import RayActorError

        now = time.monotonic()
        for ri, actor in enumerate(self.actors):
            if self._polls[ri] is None:
                self._polls[ri] = (actor.poll.remote(), now)
        for ri, (ref, sent) in enumerate(self._polls):
            view = self.replicas[ri]
            wait = max(0.0, sent + self.hang_timeout - time.monotonic()) if view.healthy else 0
            if not ray.wait([ref], timeout=wait)[0]:
                if view.healthy:
                    self._mark_hung(ri, f"no answer to a poll within {self.hang_timeout:g} s")
                continue
            self._polls[ri] = None
            try:
                p = ray.get(ref)
            except RayActorError as exc:
                self._mark_dead(ri, exc)
                continue
            with self._lock:
                if p.incarnation in view.retired:
                    continue                   # the engine found down answered after all
                if p.incarnation != view.incarnation:
                    # a new engine (first poll, or Ray restarted the actor): nothing cached
                    self.index.drop_replica(ri)
                    view.incarnation = p.incarnation
                    view.watch.reset()
                    view.new_engine()
                self.index.apply(ri, p.events)
                view.stats = p.stats
                view.healthy = p.alive
                view.error = p.error
                self._states[ri].free_pages = p.stats.kv_blocks_free
            if p.alive and view.watch.stalled(p.stats, time.monotonic()):
                self._mark_hung(ri, f"no engine step for {self.hang_timeout:g} s with "
                                    f"{p.stats.num_running + p.stats.num_waiting} requests")

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - keep polling; a replica error is handled above
                log.exception("router poll failed")
