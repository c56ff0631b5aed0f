"""KV events: what the block pool tells the world about its prefix cache.

A subscriber (a router's prefix index, a disk tier, a prefill->decode transfer) learns which
content hashes this pool can serve without re-computing them, in order:

- ``BlockStored``: a full block's K/V was computed (or loaded) and is now findable under
  ``block_hash``;
- ``BlockRemoved``: that hash is no longer findable here (its page was reused for other
  content, or the cache was reset); the page's bytes are gone from RAM;
- ``AllBlocksCleared``: nothing is findable any more; drop everything known about this pool.

Replaying the events of a pool, in order, into a dict ``{block_hash: block_id}`` reproduces
the pool's cached index exactly (the state-machine test checks this). Events are delivered
synchronously, batched per pool operation, and never built when nobody subscribed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union


@dataclass(frozen=True)
class BlockStored:
    block_hash: bytes
    parent_hash: bytes | None        # None for the first block of a sequence
    token_ids: tuple[int, ...]       # exactly the tokens hashed (block_size of them)
    cache_salt: str | None           # tenant salt mixed into the hash, if any
    block_id: int                    # the page holding it in this pool


@dataclass(frozen=True)
class BlockRemoved:
    block_hash: bytes
    block_id: int


@dataclass(frozen=True)
class AllBlocksCleared:
    pass


KVEvent = Union[BlockStored, BlockRemoved, AllBlocksCleared]
KVEventSubscriber = Callable[[list[KVEvent]], None]


def replay(events: list[KVEvent], index: dict[bytes, int]) -> None:
    """Apply ``events`` to a ``{block_hash: block_id}`` index (what a subscriber keeps)."""
    for ev in events:
        if isinstance(ev, BlockStored):
            index[ev.block_hash] = ev.block_id
        elif isinstance(ev, BlockRemoved):
            if index.get(ev.block_hash) == ev.block_id:
                del index[ev.block_hash]
        else:
            index.clear()
