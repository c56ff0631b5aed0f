"""KV connectors: where the KV manager looks for pages beyond its own RAM pool.

A connector is a second tier behind the prefix cache: a disk warehouse (``warehouse.py``), a
peer replica, a prefill node handing pages to a decode node. The KV manager
(``kv_manager.py``) uses it in two places:

- on admission, after the RAM prefix hits, it asks ``lookup`` how many *further* leading
  blocks of the request's hash chain the connector can supply, takes fresh pages for them,
  and calls ``load``; loaded pages are registered in the prefix cache like computed ones and
  count as cached tokens (usage ``cached_tokens`` / ``cache_read_input_tokens``);
- after a step computes full blocks, it calls ``save`` with the newly cached ones
  (write-through); the connector decides what to keep.

Page bytes move through a ``KVPageIO`` (the executor's ``read_kv_blocks``/``write_kv_blocks``,
or ``model/kv_pages.py``'s adapter over a model): pages are a tensor shaped
``(num_layers, 2, num_kv_heads, n_blocks, block_size, head_dim)`` in the cache's dtype.
A connector may also subscribe to the pool's KV events (``BlockPool.subscribe``).

Optionally a connector reads ahead (``PrefetchingConnector.prefetch``): when a request is
queued, ``KVCacheManager.prefetch`` hands it the blocks past the RAM hits so it can start
reading them while other work runs; ``load`` at admission then finds them read.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence


class KVPageIO(Protocol):
    """Copies whole KV pages out of and into the engine's cache."""

    def read_kv_blocks(self, block_ids: Sequence[int]) -> Any:
        """(num_layers, 2, Hkv, len(block_ids), block_size, D) copy of those pages."""

    def write_kv_blocks(self, block_ids: Sequence[int], pages: Any) -> None:
        """Overwrite those pages with ``pages`` (same shape as ``read_kv_blocks`` returns)."""


class KVConnector(Protocol):
    def lookup(self, block_hashes: Sequence[bytes]) -> int:
        """How many leading hashes of ``block_hashes`` this connector can probably supply
        (a hint: ``load`` is the authority)."""

    def load(self, block_hashes: Sequence[bytes], block_ids: Sequence[int],
             token_ids_per_block: Sequence[Sequence[int]] | None = None) -> int:
        """Fill RAM pages ``block_ids`` with the K/V of ``block_hashes`` (same length). Returns
        how many *leading* pages were loaded and verified (stored token ids equal to
        ``token_ids_per_block`` when given); pages past that count hold garbage and are not
        used. Must not raise for missing or damaged data: report fewer pages instead."""

    def save(self, block_hashes: Sequence[bytes], block_ids: Sequence[int],
             token_ids_per_block: Sequence[Sequence[int]],
             parent_hash: bytes | None = None) -> None:
        """Pages just computed and cached (``parent_hash``: the hash chained before
        ``block_hashes[0]``). May copy them now and store them later; must not raise."""

    def retain(self, block_hashes: Sequence[bytes], ttl_seconds: float) -> None:
        """Keep these blocks at least ``ttl_seconds`` from now (Anthropic ``cache_control``
        ttl), beyond what RAM pins can promise. Best effort."""


class PrefetchingConnector(KVConnector, Protocol):
    def prefetch(self, block_hashes: Sequence[bytes],
                 token_ids_per_block: Sequence[Sequence[int]],
                 parent_hash: bytes | None = None) -> None:
        """Start fetching these blocks (a chain following ``parent_hash``) in the background
        for a later ``load``. Must return at once and not raise."""


class NullConnector:
    """No second tier: every lookup misses, saves are dropped. The default."""

    def lookup(self, block_hashes: Sequence[bytes]) -> int:
        return 0

    def load(self, block_hashes: Sequence[bytes], block_ids: Sequence[int],
             token_ids_per_block: Sequence[Sequence[int]] | None = None) -> int:
        return 0

    def save(self, block_hashes: Sequence[bytes], block_ids: Sequence[int],
             token_ids_per_block: Sequence[Sequence[int]],
             parent_hash: bytes | None = None) -> None:
        return None

    def retain(self, block_hashes: Sequence[bytes], ttl_seconds: float) -> None:
        return None
