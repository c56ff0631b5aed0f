"""Per-request KV page management on top of the BlockPool: block tables, the prefix cache and
its second tier (a ``KVConnector``: disk warehouse, remote pages)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

from tokenfactory.engine.block_pool import BlockPool, PoolStats, hash_block
from tokenfactory.engine.kv_connector import KVConnector, NullConnector
from tokenfactory.engine.request import Request

log = logging.getLogger(__name__)


@dataclass
class KVCacheStats(PoolStats):
    """Pool counters plus the connector tier. ``prefix_hits`` counts every cached token
    served (RAM or connector); ``connector_hits`` is the part the connector supplied."""
    connector_queries: int = 0   # tokens asked of the connector (beyond the RAM hits)
    connector_hits: int = 0      # tokens loaded from it


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True,
                 clock: Callable[[], float], max_pinned_fraction: float = 0.5,
                 connector: KVConnector | None = None):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching=enable_prefix_caching,
                              clock=clock, max_pinned_fraction=max_pinned_fraction)
        # None when there is no second tier, so the hot paths skip it with one test
        self.connector: KVConnector | None = None
        self.connector_queries = 0
        # request id -> leading blocks of its table known to carry a hash (they keep it while
        # the request holds them), so each step looks only at blocks completed since
        self._cached_upto: dict[str, int] = {}
        self.connector_hits = 0
        if connector is not None:
            self.attach_connector(connector)

    def attach_connector(self, connector: KVConnector) -> None:
        """Put ``connector`` behind the prefix cache (once; before requests arrive). For
        callers that build the connector from the executor after the engine exists."""
        if self.connector is not None:
            raise ValueError("a KV connector is already attached")
        if not isinstance(connector, NullConnector):
            self.connector = connector

    def stats(self) -> KVCacheStats:
        s = self.pool.stats()
        return KVCacheStats(**vars(s), connector_queries=self.connector_queries,
                            connector_hits=self.connector_hits)

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def _extra_keys(self, request: Request) -> tuple:
        return (("salt", request.cache_salt),) if request.cache_salt else ()

    def _update_hashes(self, request: Request, num_tokens: int) -> None:
        """Extend ``request.block_hashes`` to cover every full block within ``num_tokens``."""
        bs = self.block_size
        extra = self._extra_keys(request)
        hashes = request.block_hashes
        for i in range(len(hashes), num_tokens // bs):
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, request.token_slice(i * bs, (i + 1) * bs), extra))

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Cached blocks reusable for this request. The last token is always recomputed so its
        logits exist, hence at most ``(num_tokens - 1) // block_size`` blocks."""
        if not self.pool.enable_prefix_caching:
            return []
        bs = self.block_size
        max_blocks = (request.num_tokens - 1) // bs
        self._update_hashes(request, request.num_tokens)
        hashes = request.block_hashes[:max_blocks]
        tokens = [request.token_slice(i * bs, (i + 1) * bs) for i in range(len(hashes))]
        hits = self.pool.lookup_prefix(hashes, tokens)
        if self.connector is not None and len(hits) < len(hashes):
            hits = hits + self._load_from_connector(request, hashes, tokens, hits)
        return hits

    def prefetch(self, request: Request) -> int:
        """A request was queued: if its prefix goes on past the RAM hits and the connector can
        read ahead (``prefetch``, optional), start reading those pages now, so the admission
        that loads them finds them read. Returns the number of blocks asked for. Changes
        nothing in the pool (no references, no stats); never raises."""
        read_ahead = getattr(self.connector, "prefetch", None)
        if read_ahead is None or not self.pool.enable_prefix_caching:
            return 0
        bs = self.block_size
        self._update_hashes(request, request.num_tokens)
        hashes = request.block_hashes[:(request.num_tokens - 1) // bs]
        tokens = [request.token_slice(i * bs, (i + 1) * bs) for i in range(len(hashes))]
        start = len(self.pool.lookup_prefix(hashes, tokens))
        if start == len(hashes):
            return 0
        try:
            read_ahead(hashes[start:], tokens[start:], hashes[start - 1] if start else None)
        except Exception:  # noqa: BLE001 - read-ahead is an optimisation
            log.exception("KV connector prefetch failed")
            return 0
        return len(hashes) - start

    def loading(self, request: Request) -> bool:
        """Whether the connector is still reading pages ``prefetch`` asked for this request:
        a scheduler with other work may admit it a step later, when ``find_cached_prefix``
        finds them read, instead of waiting for the reads inside its admission."""
        reading = getattr(self.connector, "reading", None)
        if reading is None or not request.block_hashes:
            return False
        try:
            return bool(reading(request.block_hashes))
        except Exception:  # noqa: BLE001
            log.exception("KV connector reading() failed")
            return False

    def _load_from_connector(self, request: Request, hashes: Sequence[bytes],
                             tokens: Sequence[Sequence[int]], hits: list[int]) -> list[int]:
        """Pages for the blocks after the RAM hits, loaded from the connector and registered
        in the prefix cache. They are returned unreferenced (like RAM hits), at the recently
        used end of the free list, for ``allocate_slots`` to take."""
        start = len(hits)
        rest = hashes[start:]
        self.connector_queries += len(rest) * self.block_size
        try:
            n = min(int(self.connector.lookup(rest)), len(rest))
        except Exception:  # noqa: BLE001 - a broken tier must not fail admission
            log.exception("KV connector lookup failed; recomputing")
            return []
        if n <= 0:
            return []
        # Hold the RAM hits so taking fresh pages cannot evict them.
        self.pool.touch(hits)
        fresh: list[int] = []
        loaded = 0
        try:
            n = min(n, self.pool.num_available())
            if n <= 0:
                return []
            fresh = self.pool.allocate(n)
            try:
                loaded = int(self.connector.load(rest[:n], fresh, tokens[start:start + n]))
            except Exception:  # noqa: BLE001
                log.exception("KV connector load failed; recomputing")
                loaded = 0
            loaded = max(0, min(loaded, n))
            for i in range(loaded):
                j = start + i
                self.pool.cache_block(fresh[i], hashes[j], tokens[j],
                                      hashes[j - 1] if j else None, request.cache_salt)
        finally:
            # tail first: unloaded pages (no hash) go to the head, the prefix stays warmest
            self.pool.free_blocks(list(reversed(hits + fresh)))
        self.connector_hits += loaded * self.block_size
        return fresh[:loaded]

    def blocks_needed(self, request: Request, num_new_tokens: int, num_reused: int = 0) -> int:
        total = cdiv(request.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, total - len(request.block_ids) - num_reused)

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       reused_blocks: list[int] | None = None) -> bool:
        """Make the block table cover ``num_computed_tokens + num_new_tokens`` tokens.

        ``reused_blocks`` are prefix-cache hits to attach first (admission only). Returns False,
        changing nothing, if the pool cannot supply enough pages.
        """
        reused_blocks = reused_blocks or []
        need = self.blocks_needed(request, num_new_tokens, len(reused_blocks))
        # Reused blocks sitting in the free list are not available for fresh allocation.
        reusable_from_free = sum(1 for b in reused_blocks if self.pool.blocks[b].ref_count == 0
                                 and b in self.pool.free)
        if need > self.pool.num_available() - reusable_from_free:
            return False
        if reused_blocks:
            self.pool.touch(reused_blocks)
            request.block_ids.extend(reused_blocks)
        if need:
            request.block_ids.extend(self.pool.allocate(need))
        return True

    def cache_computed_blocks(self, request: Request) -> None:
        """Register every block whose tokens all have computed KV."""
        if not self.pool.enable_prefix_caching:
            return
        bs = self.block_size
        n_full = min(request.num_computed_tokens, request.num_tokens) // bs
        self._update_hashes(request, n_full * bs)
        hashes = request.block_hashes
        new: list[int] = []   # block indexes cached by this call
        for i in range(min(self._cached_upto.get(request.request_id, 0), n_full), n_full):
            bid = request.block_ids[i]
            if self.pool.blocks[bid].block_hash is None:
                self.pool.cache_block(bid, hashes[i], request.token_slice(i * bs, (i + 1) * bs),
                                      hashes[i - 1] if i else None, request.cache_salt)
                new.append(i)
        self._cached_upto[request.request_id] = n_full
        if new and self.connector is not None:
            # each call caches a contiguous run (earlier blocks were cached by earlier steps)
            try:
                self.connector.save([hashes[i] for i in new],
                                    [request.block_ids[i] for i in new],
                                    [request.token_slice(i * bs, (i + 1) * bs) for i in new],
                                    hashes[new[0] - 1] if new[0] else None)
            except Exception:  # noqa: BLE001 - the pages stay cached in RAM regardless
                log.exception("KV connector save failed")

    def pin_breakpoints(self, request: Request) -> None:
        """Retain pages covering each cache breakpoint (Anthropic ``cache_control`` TTL)."""
        for bp in request.cache_breakpoints:
            n_blocks = min(bp.num_tokens, request.num_computed_tokens) // self.block_size
            blocks = [b for b in request.block_ids[:n_blocks]
                      if self.pool.blocks[b].block_hash is not None]
            self.pool.pin(blocks, bp.ttl_seconds)
            if self.connector is not None and n_blocks:
                try:
                    self.connector.retain(request.block_hashes[:n_blocks], bp.ttl_seconds)
                except Exception:  # noqa: BLE001
                    log.exception("KV connector retain failed")

    def free(self, request: Request) -> None:
        self._cached_upto.pop(request.request_id, None)
        # Tail first: the end of a sequence is the least likely to be shared, evict it first.
        self.pool.free_blocks(list(reversed(request.block_ids)))
        request.block_ids = []

    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks()
