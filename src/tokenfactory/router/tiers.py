"""Several KV connectors behind one prefix cache, asked in order.

A replica has one connector slot (``KVCacheManager.attach_connector``) and may need two tiers:
pages a prefill replica handed over (``disagg.TransferConnector``) and the shared disk
warehouse (``engine.warehouse``) that every replica of a fleet opens on the same directory.
``TieredConnector`` fills the leading blocks of a request from the first tier that has them,
the blocks after those from the next, and so on; computed pages are offered to every tier.
"""
from __future__ import annotations

import logging
from typing import Sequence

log = logging.getLogger(__name__)


class TieredConnector:
    """``KVConnector`` over ``tiers`` (first = fastest). ``load`` never raises: a tier that
    fails counts as having supplied nothing, and the next tier or the engine takes over."""

    def __init__(self, tiers: Sequence) -> None:
        if not tiers:
            raise ValueError("a tiered connector needs at least one tier")
        self.tiers = list(tiers)

    def lookup(self, block_hashes: Sequence[bytes]) -> int:
        n = 0
        for tier in self.tiers:
            if n == len(block_hashes):
                break
            n += min(int(tier.lookup(block_hashes[n:])), len(block_hashes) - n)
        return n

    def load(self, block_hashes: Sequence[bytes], block_ids: Sequence[int],
             token_ids_per_block: Sequence[Sequence[int]] | None = None) -> int:
        n = 0
        for tier in self.tiers:
            if n == len(block_hashes):
                break
            try:
                got = tier.load(block_hashes[n:], block_ids[n:],
                                None if token_ids_per_block is None else token_ids_per_block[n:])
            except Exception:  # noqa: BLE001 - the contract: report fewer pages, never raise
                log.exception("KV tier %s failed to load", type(tier).__name__)
                got = 0
            n += min(int(got), len(block_hashes) - n)
        return n

    def save(self, block_hashes: Sequence[bytes], block_ids: Sequence[int],
             token_ids_per_block: Sequence[Sequence[int]],
             parent_hash: bytes | None = None) -> None:
        for tier in self.tiers:
            tier.save(block_hashes, block_ids, token_ids_per_block, parent_hash)

    def retain(self, block_hashes: Sequence[bytes], ttl_seconds: float) -> None:
        for tier in self.tiers:
            tier.retain(block_hashes, ttl_seconds)

    def prefetch(self, block_hashes: Sequence[bytes],
                 token_ids_per_block: Sequence[Sequence[int]],
                 parent_hash: bytes | None = None) -> None:
        """Read-ahead for the tiers that offer it (the warehouse), on the blocks the tiers
        before them cannot supply now."""
        n = 0
        for tier in self.tiers:
            read_ahead = getattr(tier, "prefetch", None)
            if read_ahead is not None and n < len(block_hashes):
                read_ahead(block_hashes[n:], token_ids_per_block[n:],
                           block_hashes[n - 1] if n else parent_hash)
            n += min(int(tier.lookup(block_hashes[n:])), len(block_hashes) - n)
