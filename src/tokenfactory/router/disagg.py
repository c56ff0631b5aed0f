"""Disaggregated prefill/decode: a prefill replica computes a prompt's KV pages, they travel to
a decode replica through Ray's object store, and the decode replica's KV connector hands them
to its prefix cache when the request is admitted there.

- ``export_prefix`` (on the prefill replica, after it ran the prompt): copies the pages of the
  prompt's full blocks out of its cache by their hashes, re-checking each page still holds its
  hash after the copy (the engine thread may have reused it meanwhile: the export then stops
  there, and the decode replica computes the rest);
- ``TransferConnector`` (the decode replica's ``KVConnector``): keeps received pages by hash
  until the KV manager asks for them on a prefix miss; ``load`` writes them into the pages the
  manager allocated and verifies their token ids; each received page is used once.

The decode replica recomputes the prompt's last (partial) block and samples the first token,
so greedy outputs equal a single replica's.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass
class PrefixPages:
    """The KV of a prompt's leading full blocks, as shipped from prefill to decode."""

    block_hashes: list[bytes]
    token_ids: list[tuple[int, ...]]     # per block
    pages: Any                           # (num_layers, 2, Hkv, n_blocks, block_size, D) tensor
    seconds: float = 0.0                 # time to copy them out of the prefill cache
    exported_at: float = 0.0             # time.time() when the copy was done (same host clock)


def export_prefix(core, block_hashes: Sequence[bytes], kv_io) -> PrefixPages:
    """Copy the pages of the leading ``block_hashes`` that ``core``'s pool holds now."""
    import time

    t0 = time.perf_counter()
    pool = core.kv.pool
    ids = []
    for h in block_hashes:
        bid = pool.cached.get(h)
        if bid is None:
            break
        ids.append(bid)
    if not ids:
        return PrefixPages([], [], None, 0.0)
    pages = kv_io.read_kv_blocks(ids).clone()
    n = 0
    tokens = []
    for h, bid in zip(block_hashes, ids):     # still the same content after the copy?
        b = pool.blocks[bid]
        if b.block_hash != h:
            break
        tokens.append(tuple(b.token_ids))
        n += 1
    return PrefixPages(list(block_hashes[:n]), tokens, pages[:, :, :, :n].contiguous(),
                       time.perf_counter() - t0, time.time())


class TransferConnector:
    """A decode replica's KV connector: pages received from prefill replicas, by hash."""

    def __init__(self) -> None:
        self.kv_io = None                    # the executor's page IO, set once the engine exists
        self._lock = threading.Lock()
        self._pages: dict[bytes, tuple[tuple[int, ...], Any]] = {}
        self.loaded_blocks = 0

    def receive(self, prefix: PrefixPages) -> None:
        with self._lock:
            for i, (h, toks) in enumerate(zip(prefix.block_hashes, prefix.token_ids)):
                self._pages[h] = (toks, prefix.pages[:, :, :, i])

    def lookup(self, block_hashes: Sequence[bytes]) -> int:
        with self._lock:
            n = 0
            for h in block_hashes:
                if h not in self._pages:
                    break
                n += 1
            return n

    def load(self, block_hashes: Sequence[bytes], block_ids: Sequence[int],
             token_ids_per_block: Sequence[Sequence[int]] | None = None) -> int:
        import torch

        with self._lock:
            found = []
            for i, h in enumerate(block_hashes):
                entry = self._pages.get(h)
                if entry is None or (token_ids_per_block is not None
                                     and entry[0] != tuple(token_ids_per_block[i])):
                    break
                found.append(entry[1])
            for h in block_hashes[:len(found)]:
                del self._pages[h]
        if not found or self.kv_io is None:
            return 0
        self.kv_io.write_kv_blocks(list(block_ids[:len(found)]), torch.stack(found, dim=3))
        self.loaded_blocks += len(found)
        return len(found)

    def save(self, block_hashes, block_ids, token_ids_per_block, parent_hash=None) -> None:
        return None

    def retain(self, block_hashes, ttl_seconds: float) -> None:
        return None
