"""Routing policy and KV-event index: longest prefix, load bound, tenant isolation, cleanup."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from tokenfactory.engine.block_pool import hash_block
from tokenfactory.router.index import PrefixIndex, ReplicaIndex
from tokenfactory.router.policy import (LoadBound, NoHealthyReplicaError, RecentLoad, ReplicaState,
                                        RoundRobin, choose_replica, matched_blocks,
                                        request_block_hashes)

BS = 4


# The event shapes of the fixed KV-event interface (engine/kv_events.py), for the pure tests.
@dataclass(frozen=True)
class Stored:
    block_hash: bytes
    parent_hash: bytes | None
    token_ids: tuple[int, ...]
    cache_salt: str | None
    block_id: int


@dataclass(frozen=True)
class Removed:
    block_hash: bytes
    block_id: int


@dataclass(frozen=True)
class Cleared:
    pass


def stored_events(token_ids, salt=None, first_block_id=0):
    hashes = request_block_hashes(token_ids, BS, salt)
    return [Stored(h, hashes[i - 1] if i else None, tuple(token_ids[i * BS:(i + 1) * BS]), salt,
                   first_block_id + i) for i, h in enumerate(hashes)]


def test_request_hashes_are_the_block_pools_chained_hashes():
    ids = list(range(10))
    extra = (("salt", "t1"),)
    h0 = hash_block(None, ids[0:4], extra)
    h1 = hash_block(h0, ids[4:8], extra)
    assert request_block_hashes(ids, BS, "t1") == [h0, h1]       # the partial block is left out
    assert request_block_hashes(ids, BS) != [h0, h1]


def test_longest_cached_prefix_wins():
    prompt = list(range(100, 132))                              # 8 blocks
    index = PrefixIndex(3)
    index.apply(0, stored_events(prompt[:8]))                   # 2 blocks
    index.apply(1, stored_events(prompt[:24], first_block_id=10))  # 6 blocks
    index.apply(2, stored_events([7] * 32))                     # unrelated
    states = [ReplicaState(index[i], queue_depth=1, free_pages=10) for i in range(3)]
    hashes = request_block_hashes(prompt, BS)
    assert [matched_blocks(hashes, index[i]) for i in range(3)] == [2, 6, 0]
    assert choose_replica(hashes, states, "prefix") == 1
    # a prefix match means a *leading* run: a later block alone does not count
    only_tail = ReplicaIndex()
    only_tail.apply(stored_events(prompt)[5:])
    assert matched_blocks(hashes, only_tail) == 0


def test_load_bound_beats_affinity():
    prompt = list(range(64))
    hashes = request_block_hashes(prompt, BS)
    index = PrefixIndex(2)
    index.apply(0, stored_events(prompt))
    bound = LoadBound(extra_requests=2, ratio=1.25, blocks_per_request=0)
    hot = [ReplicaState(index[0], queue_depth=2, free_pages=5),
           ReplicaState(index[1], queue_depth=0, free_pages=50)]
    assert choose_replica(hashes, hot, "prefix", bound=bound) == 0       # within the slack
    hot[0].queue_depth = 3
    assert choose_replica(hashes, hot, "prefix", bound=bound) == 1       # too busy: loses
    # the relative slack grows with load: 12 vs 10 is within 1.25x
    hot[0].queue_depth, hot[1].queue_depth = 12, 10
    assert choose_replica(hashes, hot, "prefix", bound=bound) == 0
    hot[0].queue_depth = 13
    assert choose_replica(hashes, hot, "prefix", bound=bound) == 1


def test_no_match_goes_to_least_loaded_and_unhealthy_are_skipped():
    index = PrefixIndex(3)
    prompt = list(range(16))
    index.apply(2, stored_events(prompt))
    states = [ReplicaState(index[0], queue_depth=3), ReplicaState(index[1], queue_depth=1),
              ReplicaState(index[2], queue_depth=0, healthy=False)]
    hashes = request_block_hashes(prompt, BS)
    assert choose_replica(hashes, states, "prefix") == 1
    assert choose_replica(hashes, states, "least-loaded") == 1
    rr = RoundRobin()
    assert [choose_replica(hashes, states, "round-robin", round_robin=rr) for _ in range(4)] \
        == [0, 1, 0, 1]
    for s in states:
        s.healthy = False
    with pytest.raises(NoHealthyReplicaError):
        choose_replica(hashes, states, "prefix")
    with pytest.raises(ValueError, match="unknown routing policy"):
        choose_replica(hashes, [ReplicaState(index[0])], "random")


def test_least_loaded_breaks_ties_by_free_pages():
    states = [ReplicaState(set(), queue_depth=1, free_pages=3),
              ReplicaState(set(), queue_depth=1, free_pages=9),
              ReplicaState(set(), queue_depth=2, free_pages=99)]
    assert choose_replica([], states, "least-loaded") == 1


def test_tenants_never_share_a_routing_hint():
    prompt = list(range(200))
    index = PrefixIndex(2)
    index.apply(0, stored_events(prompt, salt="tenant-a"))
    states = [ReplicaState(index[0], queue_depth=0), ReplicaState(index[1], queue_depth=0)]
    hashes_a = request_block_hashes(prompt, BS, "tenant-a")
    hashes_b = request_block_hashes(prompt, BS, "tenant-b")
    assert matched_blocks(hashes_a, index[0]) == 50
    assert matched_blocks(hashes_b, index[0]) == 0
    assert not set(hashes_a) & set(hashes_b)
    # tenant A follows its cache to the busier replica; tenant B is placed by load alone
    states[0].queue_depth = 1
    assert choose_replica(hashes_a, states, "prefix") == 0
    assert choose_replica(hashes_b, states, "prefix") == 1


def test_index_follows_removal_clear_and_replica_death():
    prompt = list(range(16))
    hashes = request_block_hashes(prompt, BS)
    index = PrefixIndex(2)
    events = stored_events(prompt)
    index.apply(0, events)
    index.apply(1, stored_events(prompt, first_block_id=20))
    # the same block computed twice on replica 0 (two pages): kept until both are gone
    index.apply(0, [Stored(hashes[3], hashes[2], tuple(prompt[12:16]), None, 9)])
    index.apply(0, [Removed(hashes[3], 3)])
    assert matched_blocks(hashes, index[0]) == 4
    index.apply(0, [Removed(hashes[3], 9), Removed(hashes[2], 2)])
    assert matched_blocks(hashes, index[0]) == 2
    assert index.holders(hashes[3]) == [1]
    # a page reused for other content without a removal event seen: the old hash goes
    index.apply(0, [Stored(b"x" * 16, None, (1, 2, 3, 4), None, 1)])
    assert matched_blocks(hashes, index[0]) == 1
    index.apply(0, [Cleared()])
    assert len(index[0]) == 0
    index.drop_replica(1)
    assert index.holders(hashes[0]) == []


def test_index_matches_a_real_block_pool():
    """The router's hashes equal the engine's, and the index follows the pool's own events
    through caching and eviction."""
    from tokenfactory.engine.core import EngineConfig, EngineCore
    from tokenfactory.engine.executor import ScriptedExecutor
    from tokenfactory.engine.sampling_params import SamplingParams

    core = EngineCore(ScriptedExecutor(lambda r: [5, 6], 0),
                      EngineConfig(num_kv_blocks=8, block_size=BS, max_model_len=64),
                      model_max_len=64, eos_token_ids=[0])
    index = ReplicaIndex()
    core.kv.pool.subscribe(index.apply)

    def run(rid, prompt, salt=None):
        core.add_request(rid, prompt, SamplingParams(max_tokens=2, ignore_eos=True),
                         cache_salt=salt)
        while core.has_unfinished_requests():
            core.step()

    first = list(range(1, 18))                                  # 4 full blocks + 1 token
    run("a", first, salt="t")
    hashes = request_block_hashes(first, BS, "t")
    assert matched_blocks(hashes, index) == 4
    assert matched_blocks(request_block_hashes(first, BS), index) == 0
    for i in range(3):                                          # fill the pool: evicts "a"
        run(f"b{i}", [100 + 30 * i + j for j in range(25)])
    assert matched_blocks(hashes, index) < 4
    assert set(index) == {core.kv.pool.blocks[b].block_hash for b in range(8)} - {None}


def test_soft_load_cost_trades_cached_blocks_against_queued_requests():
    prompt = list(range(64))                                    # 16 blocks
    hashes = request_block_hashes(prompt, BS)
    index = PrefixIndex(2)
    index.apply(0, stored_events(prompt[:32]))                  # 8 blocks cached on replica 0
    states = [ReplicaState(index[0], queue_depth=1), ReplicaState(index[1], queue_depth=0)]
    # 8 blocks to prefill + 1 queued (worth 4 blocks) beats 16 blocks to prefill
    assert choose_replica(hashes, states, "prefix", bound=LoadBound(blocks_per_request=4)) == 0
    # ... but not when a queued request is worth more than the 8 blocks saved
    assert choose_replica(hashes, states, "prefix", bound=LoadBound(blocks_per_request=9)) == 1


def test_recent_load_decays_and_spreads_sessions_between_turns():
    recent = RecentLoad(2, half_life=2.0)
    recent.add(0, now=10.0)
    recent.add(0, now=10.0)
    assert recent.get(0, 10.0) == pytest.approx(2.0)
    assert recent.get(0, 12.0) == pytest.approx(1.0)
    assert recent.get(1, 12.0) == 0.0
    # nothing in flight anywhere, but replica 0 just served many turns: a new session that
    # matches only a short shared prefix there goes to replica 1
    shared = list(range(16))
    index = PrefixIndex(2)
    index.apply(0, stored_events(shared))
    hashes = request_block_hashes(shared + list(range(100, 164)), BS)
    states = [ReplicaState(index[0], recent=recent.get(0, 10.0)), ReplicaState(index[1])]
    assert choose_replica(hashes, states, "prefix", bound=LoadBound(blocks_per_request=4)) == 1
    assert choose_replica(hashes, states, "least-loaded") == 1


def test_stall_watch_flags_a_busy_engine_that_takes_no_step():
    from tokenfactory.engine.async_engine import EngineStats
    from tokenfactory.router.health import StallWatch

    def stats(running, waiting, steps):
        return EngineStats(running, waiting, 8, 8, 0, 0, 0, steps)

    w = StallWatch(timeout=5.0)
    assert not w.stalled(stats(0, 0, 10), 0.0)
    assert not w.stalled(stats(0, 0, 10), 100.0)      # idle for long: not a hang
    assert not w.stalled(stats(1, 2, 10), 101.0)      # busy from here on
    assert not w.stalled(stats(1, 2, 11), 105.0)      # a step: progress
    assert not w.stalled(stats(1, 2, 11), 110.0)      # 5 s without a step: at the limit
    assert w.stalled(stats(1, 2, 11), 110.5)          # past it
    assert w.stalled(stats(0, 1, 11), 120.0)          # waiting only, still no step
    w.reset()                                         # a restarted engine starts afresh
    assert not w.stalled(stats(1, 0, 0), 121.0)
    assert not w.stalled(stats(1, 0, 0), 125.0)
    assert w.stalled(stats(1, 0, 0), 126.5)
