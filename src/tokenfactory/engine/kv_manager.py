"""Per-request KV page management on top of the BlockPool: block tables and the prefix cache."""
from __future__ import annotations

from typing import Callable

from tokenfactory.engine.block_pool import BlockPool, hash_block
from tokenfactory.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True,
                 clock: Callable[[], float], max_pinned_fraction: float = 0.5):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching=enable_prefix_caching,
                              clock=clock, max_pinned_fraction=max_pinned_fraction)

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
        return self.pool.lookup_prefix(
            hashes, [request.token_slice(i * bs, (i + 1) * bs) for i in range(len(hashes))])

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
        for i in range(n_full):
            bid = request.block_ids[i]
            if self.pool.blocks[bid].block_hash is None:
                self.pool.cache_block(bid, request.block_hashes[i],
                                      request.token_slice(i * bs, (i + 1) * bs))

    def pin_breakpoints(self, request: Request) -> None:
        """Retain pages covering each cache breakpoint (Anthropic ``cache_control`` TTL)."""
        for bp in request.cache_breakpoints:
            n_blocks = min(bp.num_tokens, request.num_computed_tokens) // self.block_size
            blocks = [b for b in request.block_ids[:n_blocks]
                      if self.pool.blocks[b].block_hash is not None]
            self.pool.pin(blocks, bp.ttl_seconds)

    def free(self, request: Request) -> None:
        # Tail first: the end of a sequence is the least likely to be shared, evict it first.
        self.pool.free_blocks(list(reversed(request.block_ids)))
        request.block_ids = []

    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks()
