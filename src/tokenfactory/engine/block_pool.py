"""KV page pool: allocation, content-addressed prefix cache, refcounts, LRU eviction, pins.

A page ("block") holds the K/V of ``block_size`` consecutive tokens for every layer. The pool
only does bookkeeping; the tensors live in the executor. A *full* block is identified by a
chained hash of (parent block hash, its token ids, extra keys such as a tenant salt), so a block
can only be found again by a request whose whole prefix up to and including it is identical.

Freed blocks keep their hash and go to the tail of an LRU free list; they are evicted (hash
dropped) only when reused for new content. Pinned blocks (Anthropic ``cache_control`` TTLs)
sit outside the free list until their pin expires, so nothing else can evict them.

Subscribers (``subscribe``) receive the cache's changes as KV events (``kv_events.py``): a hash
becoming findable, stopping being findable, or everything cleared. With no subscriber no event
object is built.
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

from tokenfactory.engine.kv_events import (AllBlocksCleared, BlockRemoved, BlockStored, KVEvent,
                                           KVEventSubscriber)


def hash_block(parent: bytes | None, token_ids: Sequence[int], extra_keys: tuple = ()) -> bytes:
    """Chained content hash of one full block (stable across processes)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"\x00" * 16)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    for key in extra_keys:
        h.update(b"\xff" + repr(key).encode())
    return h.digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None
    token_ids: tuple[int, ...] = ()
    parent_hash: bytes | None = None   # the previous block's hash in the chain (for events)
    cache_salt: str | None = None      # the tenant salt mixed into block_hash (for events)
    pin_expiry: float = 0.0   # clock time until which the block may not be evicted
    pin_ttl: float = 0.0      # refresh interval applied on every hit


@dataclass
class PoolStats:
    num_blocks: int
    num_free: int           # ref_count == 0 (evictable now or pinned)
    num_pinned: int         # ref_count == 0 but pinned against eviction
    num_cached: int         # blocks that currently carry a content hash
    prefix_queries: int     # tokens looked up in the prefix cache
    prefix_hits: int        # tokens found


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True,
                 clock: Callable[[], float], max_pinned_fraction: float = 0.5):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.clock = clock
        self.max_pinned = int(num_blocks * max_pinned_fraction)
        self.blocks = [Block(i) for i in range(num_blocks)]
        # ref_count == 0 and not pinned; head = least recently freed = next to evict.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        # ref_count == 0 but pinned until Block.pin_expiry.
        self.pinned_free: dict[int, None] = {}
        # Every block whose pin may still be live (pin_expiry > now), so counting live pins
        # scans only these, not the whole pool; expired ones are pruned in pin().
        self.pin_holders: set[int] = set()
        self.cached: dict[bytes, int] = {}
        self.prefix_queries = 0
        self.prefix_hits = 0
        self._subscribers: list[KVEventSubscriber] = []

    # ----------------------------------------------------------------- events
    def subscribe(self, fn: KVEventSubscriber) -> None:
        """Call ``fn(events)`` after every pool operation that changed the cached index, with
        that operation's events in order. Subscribe before the pool is used (or after a reset)
        to see a complete history."""
        self._subscribers.append(fn)

    def unsubscribe(self, fn: KVEventSubscriber) -> None:
        self._subscribers.remove(fn)

    def _emit(self, events: list[KVEvent]) -> None:
        if events:
            for fn in self._subscribers:
                fn(events)

    def _forget(self, b: Block, events: list[KVEvent] | None) -> None:
        """Drop a block's content hash (its page is about to hold something else)."""
        if self.cached.get(b.block_hash) == b.block_id:
            del self.cached[b.block_hash]
            if events is not None:
                events.append(BlockRemoved(b.block_hash, b.block_id))
        b.block_hash, b.token_ids, b.parent_hash, b.cache_salt = None, (), None, None

    # ---------------------------------------------------------------- queries
    def num_available(self) -> int:
        """Blocks that could be handed out right now (after expiring stale pins)."""
        self._expire_pins()
        return len(self.free)

    def num_free_blocks(self) -> int:
        return len(self.free) + len(self.pinned_free)

    def stats(self) -> PoolStats:
        return PoolStats(self.num_blocks, self.num_free_blocks(), len(self.pinned_free),
                         len(self.cached), self.prefix_queries, self.prefix_hits)

    def lookup_prefix(self, block_hashes: Sequence[bytes],
                      token_blocks: Sequence[Sequence[int]]) -> list[int]:
        """Longest run of cached blocks matching ``block_hashes`` (tokens verified). No refs taken."""
        hits: list[int] = []
        if not self.enable_prefix_caching:
            return hits
        for h, toks in zip(block_hashes, token_blocks):
            bid = self.cached.get(h)
            if bid is None or self.blocks[bid].token_ids != tuple(toks):
                break
            hits.append(bid)
        return hits

    def record_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_query_tokens
        self.prefix_hits += num_hit_tokens

    # ------------------------------------------------------------- allocation
    def touch(self, block_ids: Sequence[int]) -> None:
        """Take a reference on cached blocks a request is about to reuse."""
        now = self.clock()
        for bid in block_ids:
            b = self.blocks[bid]
            if b.ref_count == 0:
                self.free.pop(bid, None)
                self.pinned_free.pop(bid, None)
            b.ref_count += 1
            if b.pin_ttl:
                b.pin_expiry = max(b.pin_expiry, now + b.pin_ttl)  # a hit refreshes the TTL
                self.pin_holders.add(bid)

    def allocate(self, n: int) -> list[int]:
        """Hand out ``n`` fresh blocks, evicting least-recently-freed cached content."""
        if n > self.num_available():
            raise RuntimeError(f"asked for {n} KV blocks, {len(self.free)} available")
        out = []
        events: list[KVEvent] | None = [] if self._subscribers else None
        for _ in range(n):
            bid, _ = self.free.popitem(last=False)
            b = self.blocks[bid]
            if b.block_hash is not None:
                self._forget(b, events)
            b.pin_expiry = b.pin_ttl = 0.0
            b.ref_count = 1
            out.append(bid)
        if events:
            self._emit(events)
        return out

    def free_blocks(self, block_ids: Sequence[int]) -> None:
        """Drop one reference from each block; pass them tail-first so tails are evicted first."""
        now = self.clock()
        for bid in block_ids:
            b = self.blocks[bid]
            if b.ref_count <= 0:
                raise RuntimeError(f"double free of KV block {bid}")
            b.ref_count -= 1
            if b.ref_count == 0:
                if b.block_hash is None:
                    # Nothing worth keeping: put it at the head so it is reused first.
                    self.free[bid] = None
                    self.free.move_to_end(bid, last=False)
                elif b.pin_expiry > now:
                    self.pinned_free[bid] = None
                else:
                    self.free[bid] = None

    def cache_block(self, block_id: int, block_hash: bytes, token_ids: Sequence[int],
                    parent_hash: bytes | None = None, cache_salt: str | None = None) -> bool:
        """Register a block whose KV is now fully computed under its content hash. Returns
        True when the hash became findable here (False: caching is off, the block already
        had a hash, or an identical block is already the canonical copy)."""
        if not self.enable_prefix_caching:
            return False
        b = self.blocks[block_id]
        if b.block_hash is not None:
            return False
        b.block_hash, b.token_ids = block_hash, tuple(token_ids)
        b.parent_hash, b.cache_salt = parent_hash, cache_salt
        # If an identical block is already cached, keep the older one as the canonical copy.
        if self.cached.setdefault(block_hash, block_id) != block_id:
            return False
        if self._subscribers:
            self._emit([BlockStored(block_hash, parent_hash, b.token_ids, cache_salt, block_id)])
        return True

    def pin(self, block_ids: Sequence[int], ttl_seconds: float) -> None:
        """Retain blocks against eviction for ``ttl_seconds`` from now (and on every hit)."""
        now = self.clock()
        self.pin_holders = {b for b in self.pin_holders if self.blocks[b].pin_expiry > now}
        pinned_now = len(self.pin_holders)
        for bid in block_ids:
            b = self.blocks[bid]
            if b.pin_expiry <= now:
                if pinned_now >= self.max_pinned:
                    break  # never let pins starve the pool; the rest stays plainly cached
                pinned_now += 1
            b.pin_ttl = max(b.pin_ttl, ttl_seconds)
            b.pin_expiry = max(b.pin_expiry, now + ttl_seconds)
            self.pin_holders.add(bid)

    def _expire_pins(self) -> None:
        if not self.pinned_free:
            return
        now = self.clock()
        expired = [bid for bid in self.pinned_free if self.blocks[bid].pin_expiry <= now]
        for bid in sorted(expired, key=lambda i: self.blocks[i].pin_expiry):
            del self.pinned_free[bid]
            self.blocks[bid].pin_ttl = 0.0
            self.free[bid] = None

    def release_pins(self) -> int:
        """Make every unused pinned block evictable now. Pins are best-effort retention: when a
        request could otherwise never get its pages (nothing running will free any), they give
        way. Returns how many blocks were released."""
        released = list(self.pinned_free)
        for bid in released:
            self.blocks[bid].pin_expiry = self.blocks[bid].pin_ttl = 0.0
            self.free[bid] = None
        self.pinned_free.clear()
        return len(released)

    def reset_prefix_cache(self) -> None:
        """Forget all cached content (only blocks not in use). Subscribers get
        ``AllBlocksCleared`` when nothing stays cached, else one ``BlockRemoved`` per hash."""
        for bid in list(self.pinned_free):
            self.free[bid] = None
        self.pinned_free.clear()
        events: list[KVEvent] | None = [] if self._subscribers else None
        for b in self.blocks:
            if b.ref_count == 0 and b.block_hash is not None:
                self._forget(b, events)
                b.pin_expiry = b.pin_ttl = 0.0
        if events:
            self._emit([AllBlocksCleared()] if not self.cached else events)
