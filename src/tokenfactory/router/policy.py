"""Routing policy: which replica gets a request, as a plain function of (request hashes, replica
states), so the same code routes live traffic (router/engine.py) and a simulated fleet
(router/simulate.py) and is unit-testable without either.

Policies:

- ``prefix`` (default): the replica holding the longest run of the request's leading block
  hashes, *bounded by load*, twice over. Hard: a replica whose queue exceeds the least loaded
  one's by more than the ``LoadBound`` margin is not eligible, so one hot prefix spreads over
  several replicas instead of melting one. Soft: among the eligible, the cost is the blocks
  left to prefill plus ``LoadBound.blocks_per_request`` per request already queued there (as
  NVIDIA Dynamo's KV router weighs overlap against load), so a prefix that every replica
  holds (a shared system prompt) does not pull new sessions onto the busiest replicas while a
  session's own long history still keeps it where that history is. Ties go to the least
  loaded.
- ``least-loaded``: the smallest load (queue depth plus recent requests), then the most free
  KV pages.
- ``round-robin``: the next healthy replica in turn (cursor kept in ``RoundRobin``).

Tenant isolation needs nothing here: the hashes are the block pool's chained hashes with the
tenant's cache salt mixed in (``request_block_hashes``), so two tenants sending the same prompt
produce disjoint hashes and never see each other's routing hints.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Container, Sequence

from tokenfactory.engine.block_pool import hash_block

POLICIES = ("prefix", "round-robin", "least-loaded")


class NoHealthyReplicaError(RuntimeError):
    """Every replica is down: the request cannot be placed."""


@dataclass
class ReplicaState:
    """What the router knows about one replica when it places a request."""

    cached: Container[bytes]    # block hashes the replica holds (router/index.py keeps these)
    queue_depth: int = 0        # requests routed to it and not finished (waiting + running)
    free_pages: int = 0         # KV pages it could hand out (free or evictable)
    total_pages: int = 0
    healthy: bool = True
    # Requests routed to it recently (``RecentLoad``): a session between turns has nothing in
    # flight but will be back, so queue depth alone makes a replica whose sessions are all
    # thinking look idle; at low load this is what spreads new sessions.
    recent: float = 0.0

    @property
    def load(self) -> float:
        return self.queue_depth + self.recent


@dataclass(frozen=True)
class LoadBound:
    """How much busier than the least loaded replica a prefix match may make us go.

    A replica's load is its queue depth plus its recent requests (``ReplicaState.load``). It is
    eligible for prefix affinity when its load is at most ``max(min_load + extra_requests,
    min_load * ratio)``: an absolute slack so a small fleet does not bounce sessions around at
    low load, a relative one so the slack grows with load.
    """

    extra_requests: float = 4
    ratio: float = 1.5
    # what one unit of load costs, in blocks of prefill it would take to make up for it
    blocks_per_request: float = 32.0

    def limit(self, min_load: float) -> float:
        return max(min_load + self.extra_requests, min_load * self.ratio)


class RecentLoad:
    """Requests routed to each replica, decaying with ``half_life`` seconds (of whatever
    clock the caller passes: wall time live, simulated time in router/simulate.py)."""

    def __init__(self, num_replicas: int, half_life: float = 5.0):
        self.half_life = half_life
        self._value = [0.0] * num_replicas
        self._time = [0.0] * num_replicas

    def get(self, replica: int, now: float) -> float:
        dt = max(0.0, now - self._time[replica])
        return self._value[replica] * 0.5 ** (dt / self.half_life)

    def add(self, replica: int, now: float, amount: float = 1.0) -> None:
        self._value[replica] = self.get(replica, now) + amount
        self._time[replica] = now


@dataclass
class RoundRobin:
    """The round-robin cursor (explicit state, so the policy function stays plain)."""

    next_index: int = field(default=0)


def request_block_hashes(token_ids: Sequence[int], block_size: int,
                         cache_salt: str | None = None, *,
                         parent: bytes | None = None) -> list[bytes]:
    """The chained hashes of every full block of ``token_ids``, exactly as the block pool
    computes them (``engine.block_pool.hash_block`` with the salt as the extra key).
    ``parent``: the hash of the block just before ``token_ids`` (extending a known prefix)."""
    extra = (("salt", cache_salt),) if cache_salt else ()
    out: list[bytes] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start:start + block_size], extra)
        out.append(parent)
    return out


def matched_blocks(request_hashes: Sequence[bytes], cached: Container[bytes]) -> int:
    """How many leading hashes ``cached`` holds (a prefix match: stops at the first miss)."""
    n = 0
    for h in request_hashes:
        if h not in cached:
            break
        n += 1
    return n


def choose_replica(request_hashes: Sequence[bytes], replicas: Sequence[ReplicaState],
                   policy: str = "prefix", *, round_robin: RoundRobin | None = None,
                   bound: LoadBound = LoadBound()) -> int:
    """Index of the replica that should serve a request whose prompt blocks hash to
    ``request_hashes``. Only healthy replicas are considered; raises NoHealthyReplicaError
    when there are none, ValueError for an unknown policy."""
    healthy = [i for i, r in enumerate(replicas) if r.healthy]
    if not healthy:
        raise NoHealthyReplicaError("no healthy replica")
    if policy == "round-robin":
        rr = round_robin if round_robin is not None else RoundRobin()
        n = len(replicas)
        for k in range(n):
            i = (rr.next_index + k) % n
            if replicas[i].healthy:
                rr.next_index = (i + 1) % n
                return i
    if policy == "least-loaded":
        return min(healthy, key=lambda i: (replicas[i].load, -replicas[i].free_pages, i))
    if policy != "prefix":
        raise ValueError(f"unknown routing policy {policy!r}; choose one of {', '.join(POLICIES)}")
    limit = bound.limit(min(replicas[i].load for i in healthy))
    eligible = [i for i in healthy if replicas[i].load <= limit]
    n = len(request_hashes)

    def cost(i: int) -> tuple:
        r = replicas[i]
        to_prefill = n - matched_blocks(request_hashes, r.cached)
        return (to_prefill + bound.blocks_per_request * r.load, r.load, -r.free_pages, i)
    return min(eligible, key=cost)
