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
so greedy outputs equal a single replica's. The router records each hand-over
(``TransferRecord`` / ``TransferTotals``) and corrects usage (``bill_transfer``): the decode
replica counts loaded pages as cached, but they were computed for this request.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Sequence

from tokenfactory.engine.request import RequestOutput


@dataclass
class PrefixPages:
    """The KV of a prompt's leading full blocks, as shipped from prefill to decode."""

    block_hashes: list[bytes]
    token_ids: list[tuple[int, ...]]     # per block
    # (num_layers, 2, Hkv, n_blocks, block_size, D): the pages' bits as a numpy integer array
    # of the cache dtype's width (numpy has no bfloat16), which Ray's object store shares
    # zero-copy instead of pickling a tensor
    pages: Any
    dtype: str = ""                      # the cache's torch dtype, e.g. "bfloat16"
    seconds: float = 0.0                 # time to copy them out of the prefill cache
    exported_at: float = 0.0             # time.time() when the copy was done (same host clock)


def _bits_dtype(element_size: int):
    """The torch integer dtype as wide as a cache element (to move its bits through numpy)."""
    import torch
    return {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[element_size]


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
        return PrefixPages([], [], None)
    pages = kv_io.read_kv_blocks(ids)         # a copy: the cache may change under us now
    n = 0
    tokens = []
    for h, bid in zip(block_hashes, ids):     # still the same content after the copy?
        b = pool.blocks[bid]
        if b.block_hash != h:
            break
        tokens.append(tuple(b.token_ids))
        n += 1
    pages = pages[:, :, :, :n].contiguous()
    bits = pages.view(_bits_dtype(pages.element_size())).numpy()
    return PrefixPages(list(block_hashes[:n]), tokens, bits, str(pages.dtype).split(".")[-1],
                       time.perf_counter() - t0, time.time())


class TransferConnector:
    """A decode replica's KV connector: pages received from prefill replicas, by hash.

    Received pages are views into Ray's object store, which they keep alive: a transfer is
    dropped whole once any of its pages was loaded (the request got them), and at most
    ``max_transfers`` wait for their request (the oldest go first: an aborted request's
    pages must not pin the store)."""

    def __init__(self, max_transfers: int = 16) -> None:
        self.kv_io = None                    # the executor's page IO, set once the engine exists
        self.max_transfers = max_transfers
        self._lock = threading.Lock()
        self._pages: dict[bytes, tuple[tuple[int, ...], Any, str, int]] = {}
        self._transfers: OrderedDict[int, list[bytes]] = OrderedDict()
        self._next_id = 0
        self.loaded_blocks = 0
        # Usage must not bill transferred pages as cache reads: blocks loaded per request id
        # (the tag a transfer was received with), until ``take_loaded``.
        self._tags: dict[int, str] = {}
        self._loaded_for: dict[str, int] = {}

    def receive(self, prefix: PrefixPages, tag: str | None = None) -> None:
        """Keep ``prefix``'s pages for a request to load; ``tag`` (its request id) lets
        ``loaded_for`` say how many of them that request took."""
        with self._lock:
            tid = self._next_id
            self._next_id += 1
            self._transfers[tid] = list(prefix.block_hashes)
            if tag is not None:
                self._tags[tid] = tag
            for i, (h, toks) in enumerate(zip(prefix.block_hashes, prefix.token_ids)):
                self._pages[h] = (toks, prefix.pages[:, :, :, i], prefix.dtype, tid)
            while len(self._transfers) > self.max_transfers:
                self._drop(next(iter(self._transfers)))

    def loaded_for(self, tag: str) -> int:
        """Blocks the request tagged ``tag`` loaded from its transfer so far."""
        with self._lock:
            return self._loaded_for.get(tag, 0)

    def forget(self, tag: str) -> None:
        """The request is over: drop its count."""
        with self._lock:
            self._loaded_for.pop(tag, None)

    def _drop(self, tid: int) -> None:
        self._tags.pop(tid, None)
        for h in self._transfers.pop(tid, ()):
            entry = self._pages.get(h)
            if entry is not None and entry[3] == tid:
                del self._pages[h]

    def pending_blocks(self) -> int:
        with self._lock:
            return len(self._pages)

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
        import numpy as np
        import torch

        with self._lock:
            found = []
            dtype = ""
            used: set[int] = set()
            for i, h in enumerate(block_hashes):
                entry = self._pages.get(h)
                if entry is None or (token_ids_per_block is not None
                                     and entry[0] != tuple(token_ids_per_block[i])):
                    break
                found.append(entry[1])
                dtype = entry[2]
                used.add(entry[3])
                tag = self._tags.get(entry[3])
                if tag is not None:
                    self._loaded_for[tag] = self._loaded_for.get(tag, 0) + 1
            for tid in used:     # the request has its pages: the rest of them is not needed
                self._drop(tid)
        if not found or self.kv_io is None:
            return 0
        # one copy, out of the (read-only, shared) object store buffers into a writable array
        bits = torch.from_numpy(np.stack(found, axis=3))
        self.kv_io.write_kv_blocks(list(block_ids[:len(found)]),
                                   bits.view(getattr(torch, dtype)))
        self.loaded_blocks += len(found)
        return len(found)

    def save(self, block_hashes, block_ids, token_ids_per_block, parent_hash=None) -> None:
        return None

    def retain(self, block_hashes, ttl_seconds: float) -> None:
        return None


@dataclass
class TransferRecord:
    """One prefill -> decode hand-over (disaggregated mode)."""

    tokens: int                 # prompt tokens whose pages moved
    export_seconds: float       # copying them out of the prefill replica's cache
    seconds: float              # export done -> pages in the decode replica (object store hop)


@dataclass
class TransferTotals:
    """Running sums over every hand-over (``tokenfactory_kv_transfer_*`` in /metrics)."""

    count: int = 0
    tokens: int = 0
    export_seconds: float = 0.0
    seconds: float = 0.0

    def add(self, r: TransferRecord) -> None:
        self.count += 1
        self.tokens += r.tokens
        self.export_seconds += r.export_seconds
        self.seconds += r.seconds


def bill_transfer(out: RequestOutput, transferred: int, prefill_cached: int) -> RequestOutput:
    """The decode replica counts pages a prefill replica handed over as cached; for usage
    they were computed for this request, except where the prefill replica itself reused its
    cache. Both caches hold prefixes: the decode replica's RAM hits are the first
    ``reported - transferred`` tokens, the transfer the next ones, and the prefill replica's
    own hits its first ``prefill_cached``; a token was truly reused if either cache had it."""
    reported = out.num_cached_tokens
    cached = max(reported - transferred, min(prefill_cached, reported))
    return replace(out, num_cached_tokens=cached)
