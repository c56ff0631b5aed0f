"""A state-machine test of the block pool and KV manager (issue 15, part 5).

Hypothesis drives a small pool through random admissions (with shared prefixes and tenant
salts, so prefix hits and evictions happen), decodes, finishes, preemptions, TTL pins, clock
jumps, pin releases, cache resets and loads from a second tier. A fake page store stands in
for the K/V tensors: "computing" a token writes it into its page slot, so after every step we
can check that what the cache claims a page holds is what the page really holds.

Invariants: every refcount equals the number of live block tables holding the block (so
>= 0); free + used = total; a cached hash maps to a page whose tokens are exactly the ones
hashed (and the page holds them); replaying the pool's KV events reproduces its cached index;
every prefix hit hands out pages holding the request's tokens; the second tier only ever
receives pages holding the tokens it is told.
"""
from __future__ import annotations

from typing import Sequence

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tokenfactory.engine.block_pool import hash_block
from tokenfactory.engine.kv_events import BlockStored, KVEvent, replay
from tokenfactory.engine.kv_manager import KVCacheManager
from tokenfactory.engine.request import CacheBreakpoint, Request
from tokenfactory.engine.sampling_params import SamplingParams

BLOCK = 2
NUM_BLOCKS = 10
Page = list  # BLOCK slots, each a token id or None (never written)


class DictTier:
    """A second tier keeping token ids per hash; loading writes them into the fake pages."""

    def __init__(self, pages: list[Page]):
        self.pages = pages
        self.store: dict[bytes, tuple[int, ...]] = {}
        self.short_loads = False     # load fewer pages than lookup promised (a damaged file)

    def lookup(self, block_hashes: Sequence[bytes]) -> int:
        n = 0
        while n < len(block_hashes) and block_hashes[n] in self.store:
            n += 1
        return n

    def load(self, block_hashes, block_ids, token_ids_per_block=None) -> int:
        n = 0
        for h, bid, toks in zip(block_hashes, block_ids, token_ids_per_block):
            if self.short_loads and n == 1:
                self.pages[bid] = [-1] * BLOCK   # garbage, reported as not loaded
                break
            if self.store.get(h) != tuple(toks):
                break
            self.pages[bid] = list(self.store[h])
            n += 1
        return n

    def save(self, block_hashes, block_ids, token_ids_per_block, parent_hash=None) -> None:
        for h, bid, toks in zip(block_hashes, block_ids, token_ids_per_block):
            assert self.pages[bid] == list(toks), "the tier was handed a page with other tokens"
            self.store[h] = tuple(toks)

    def retain(self, block_hashes, ttl_seconds) -> None:
        pass


class PoolMachine(RuleBasedStateMachine):
    @initialize(with_tier=st.booleans())
    def setup(self, with_tier: bool):
        self.now = 0.0
        self.pages: list[Page] = [[None] * BLOCK for _ in range(NUM_BLOCKS)]
        self.tier = DictTier(self.pages) if with_tier else None
        self.kv = KVCacheManager(NUM_BLOCKS, BLOCK, clock=lambda: self.now,
                                 max_pinned_fraction=0.5, connector=self.tier)
        self.shadow: dict[bytes, int] = {}
        self.kv.pool.subscribe(self._on_events)
        self.running: list[Request] = []
        self.n = 0

    def _on_events(self, events: list[KVEvent]) -> None:
        assert events, "empty event batches are not delivered"
        for ev in events:
            if isinstance(ev, BlockStored):
                extra = (("salt", ev.cache_salt),) if ev.cache_salt else ()
                assert hash_block(ev.parent_hash, ev.token_ids, extra) == ev.block_hash
        replay(events, self.shadow)

    # ------------------------------------------------------------------ helpers
    def _compute(self, req: Request, start: int, end: int) -> None:
        """The executor's part: write tokens [start, end) into the request's pages."""
        for p in range(start, end):
            self.pages[req.block_ids[p // BLOCK]][p % BLOCK] = req.token_at(p)
        req.num_computed_tokens = end
        self.kv.cache_computed_blocks(req)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0

    # -------------------------------------------------------------------- rules
    @rule(prefix=st.sampled_from([(), (1, 2), (1, 2, 3, 4), (5, 6, 7, 8, 9, 1)]),
          tail=st.lists(st.integers(1, 2), min_size=1, max_size=5),
          salt=st.sampled_from([None, None, "t1"]), ttl=st.sampled_from([0.0, 0.0, 5.0, 60.0]))
    def admit(self, prefix, tail, salt, ttl):
        prompt = list(prefix) + tail
        self.n += 1
        bps = (CacheBreakpoint(len(prompt), ttl),) if ttl else ()
        req = Request(f"r{self.n}", prompt, SamplingParams(max_tokens=4), cache_salt=salt,
                      cache_breakpoints=bps)
        loaded_before = self.kv.connector_hits
        cached = self.kv.find_cached_prefix(req)
        if self.kv.connector_hits > loaded_before:
            event("pages loaded from the tier")
            if self.tier.short_loads:
                event("a short load from the tier")
        for i, bid in enumerate(cached):   # a hit hands out pages holding our tokens
            assert self.pages[bid] == req.token_slice(i * BLOCK, (i + 1) * BLOCK)
        num_cached = len(cached) * BLOCK
        assert num_cached < len(prompt)
        req.num_computed_tokens = num_cached
        if not self.kv.allocate_slots(req, len(prompt) - num_cached, cached):
            req.num_computed_tokens = 0
            assert req.block_ids == []
            return
        self.kv.pool.record_lookup(len(prompt), num_cached)
        self.running.append(req)
        self._compute(req, num_cached, len(prompt))
        self.kv.pin_breakpoints(req)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), token=st.integers(1, 4))
    def decode(self, data, token):
        req = data.draw(st.sampled_from(self.running))
        req.output_token_ids.append(token)
        while not self.kv.allocate_slots(req, 1):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is req:
                return
        self._compute(req, req.num_computed_tokens, req.num_tokens)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def finish(self, data):
        req = data.draw(st.sampled_from(self.running))
        self.running.remove(req)
        self.kv.free(req)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def preempt(self, data):
        self._preempt(data.draw(st.sampled_from(self.running)))

    @rule()
    def flood(self):
        """Another request takes every available page for a moment: all unpinned cached
        content in the free list is evicted (and must then come from the tier or be
        recomputed)."""
        pool = self.kv.pool
        pool.free_blocks(pool.allocate(pool.num_available()))

    @rule(seconds=st.sampled_from([1.0, 10.0, 100.0]))
    def advance_clock(self, seconds):
        self.now += seconds

    @rule()
    def release_pins(self):
        self.kv.pool.release_pins()

    @rule()
    def reset(self):
        self.kv.pool.reset_prefix_cache()

    @precondition(lambda self: self.tier is not None and self.tier.store)
    @rule(data=st.data())
    def tier_drops_a_page(self, data):
        h = data.draw(st.sampled_from(sorted(self.tier.store)))
        del self.tier.store[h]

    @precondition(lambda self: self.tier is not None)
    @rule(short=st.booleans())
    def tier_short_loads(self, short):
        self.tier.short_loads = short

    # --------------------------------------------------------------- invariants
    @invariant()
    def refcounts_match_block_tables(self):
        pool = self.kv.pool
        holders = [0] * NUM_BLOCKS
        for req in self.running:
            for bid in req.block_ids:
                holders[bid] += 1
        for b in pool.blocks:
            assert b.ref_count >= 0
            assert b.ref_count == holders[b.block_id]

    @invariant()
    def free_plus_used_is_total(self):
        pool = self.kv.pool
        used = sum(1 for b in pool.blocks if b.ref_count > 0)
        assert not set(pool.free) & set(pool.pinned_free)
        assert all(pool.blocks[b].ref_count == 0 for b in [*pool.free, *pool.pinned_free])
        assert pool.num_free_blocks() + used == NUM_BLOCKS
        s = self.kv.stats()
        assert s.num_free + used == s.num_blocks == NUM_BLOCKS

    @invariant()
    def cached_pages_hold_their_tokens(self):
        pool = self.kv.pool
        for h, bid in pool.cached.items():
            b = pool.blocks[bid]
            assert b.block_hash == h
            extra = (("salt", b.cache_salt),) if b.cache_salt else ()
            assert hash_block(b.parent_hash, b.token_ids, extra) == h
        for b in pool.blocks:   # duplicates of a canonical block too: a hit may find them
            if b.block_hash is not None:
                assert self.pages[b.block_id] == list(b.token_ids)

    @invariant()
    def events_replay_to_the_cached_index(self):
        assert self.shadow == self.kv.pool.cached

    @invariant()
    def stats_are_consistent(self):
        s = self.kv.stats()
        assert 0 <= s.prefix_hits <= s.prefix_queries
        assert 0 <= s.connector_hits <= s.connector_queries
        assert s.num_cached == len(self.kv.pool.cached)


PoolMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=40, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
TestPoolStateMachine = PoolMachine.TestCase


def test_resetting_everything_is_one_cleared_event():
    """A reset that leaves nothing cached is announced as AllBlocksCleared, not per block; a
    subscriber added late sees only what happens after it subscribed."""
    kv = KVCacheManager(4, BLOCK, clock=lambda: 0.0)
    req = Request("a", [1, 2, 3, 4, 5], SamplingParams())
    assert kv.allocate_slots(req, 5)
    req.num_computed_tokens = 5
    kv.cache_computed_blocks(req)
    assert len(kv.pool.cached) == 2
    got: list = []
    kv.pool.subscribe(got.append)
    kv.free(req)
    kv.pool.reset_prefix_cache()
    assert [type(e).__name__ for batch in got for e in batch] == ["AllBlocksCleared"]
