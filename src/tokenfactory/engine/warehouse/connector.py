"""``WarehouseConnector``: the disk warehouse as the KV manager's second tier (a ``KVConnector``).

- ``save`` (write-through, called when a step caches full blocks): pages the directory does
  not hold yet are copied out of the KV cache at once (the engine may reuse those pages on
  the next step) and written by a background thread, so a step never waits for the disk.
  A page waiting to be written is already served from memory. If the writer falls behind by
  ``max_pending`` pages, further saves are dropped (counted): the warehouse is a cache.
- ``lookup`` counts the leading hashes that are pending or have a file; ``load`` reads and
  verifies them (checksum, stored token ids, the hash chain) and writes the pages into the
  given RAM blocks. The first page that fails stops the load; it is recomputed.
- ``retain`` (a cache breakpoint's TTL) is queued behind the pending writes, so it applies to
  the pages just saved.

Write-through (rather than writing on RAM eviction) is what lets a page survive ``kill -9``
and be read by another process on the same directory at once.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
from dataclasses import asdict
from typing import Sequence

import numpy as np
import torch

from tokenfactory.engine.kv_connector import KVPageIO
from tokenfactory.engine.warehouse.store import PageRecord, PageStore
from tokenfactory.model.kv_pages import as_numpy_bits

log = logging.getLogger(__name__)


class WarehouseConnector:
    def __init__(self, store: PageStore, kv_io: KVPageIO, page_shape: Sequence[int],
                 dtype: torch.dtype, *, async_writes: bool = True, max_pending: int = 256):
        self.store = store
        self.kv_io = kv_io
        self.page_shape = tuple(page_shape)          # (num_layers, 2, Hkv, block_size, D)
        self.dtype = dtype
        self.page_bytes = math.prod(self.page_shape) * torch.empty((), dtype=dtype).element_size()
        self.max_pending = max_pending
        self.dropped_saves = 0
        self.pages_loaded = 0
        self._pending: dict[bytes, PageRecord] = {}
        self._lock = threading.Lock()                # guards _pending and the store's stats
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        if async_writes:
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._writer, name="kv-warehouse-writer",
                                            daemon=True)
            self._thread.start()

    # -------------------------------------------------------------- connector
    def lookup(self, block_hashes: Sequence[bytes]) -> int:
        n = 0
        for h in block_hashes:
            with self._lock:
                pending = h in self._pending
            if not (pending or self.store.contains(h)):
                break
            n += 1
        return n

    def load(self, block_hashes: Sequence[bytes], block_ids: Sequence[int],
             token_ids_per_block: Sequence[Sequence[int]] | None = None) -> int:
        payloads: list[bytes | memoryview] = []
        prev: bytes | None = None
        for i, h in enumerate(block_hashes):
            toks = None if token_ids_per_block is None else token_ids_per_block[i]
            with self._lock:
                rec = self._pending.get(h)
            if rec is None:
                rec = self.store.read(h, toks, prev, check_parent=i > 0)
            elif (toks is not None and rec.token_ids != tuple(toks)) or (
                    i > 0 and rec.parent_hash != prev):
                rec = None
            if rec is None or len(rec.payload) != self.page_bytes:
                break
            payloads.append(rec.payload)
            prev = h
        n = len(payloads)
        if n:
            buf = np.empty((n, self.page_bytes), dtype=np.uint8)
            for j, payload in enumerate(payloads):
                buf[j] = np.frombuffer(payload, dtype=np.uint8)
            pages = torch.from_numpy(buf).view(self.dtype).view(n, *self.page_shape)
            # (n, L, 2, Hkv, bs, D) -> (L, 2, Hkv, n, bs, D)
            self.kv_io.write_kv_blocks(list(block_ids[:n]), pages.permute(1, 2, 3, 0, 4, 5))
            self.pages_loaded += n
        return n

    def save(self, block_hashes: Sequence[bytes], block_ids: Sequence[int],
             token_ids_per_block: Sequence[Sequence[int]],
             parent_hash: bytes | None = None) -> None:
        parents = [parent_hash, *block_hashes[:-1]]
        with self._lock:
            todo = [i for i, h in enumerate(block_hashes) if h not in self._pending]
            room = self.max_pending - len(self._pending)
        todo = [i for i in todo if not self.store.contains(block_hashes[i])]
        if not todo:
            return
        if len(todo) > room:
            self.dropped_saves += len(todo) - max(room, 0)
            todo = todo[:max(room, 0)]
            if not todo:
                return
        pages = self.kv_io.read_kv_blocks([block_ids[i] for i in todo])  # (L,2,Hkv,n,bs,D)
        # one page's bytes contiguous: (n, L, 2, Hkv, bs, D), copied by numpy (see kv_pages)
        per_block = as_numpy_bits(pages.cpu()).transpose(3, 0, 1, 2, 4, 5)
        records = [PageRecord(block_hashes[i], parents[i], tuple(token_ids_per_block[i]),
                              per_block[j].tobytes()) for j, i in enumerate(todo)]
        if self._queue is None:
            for r in records:
                self._write(r)
            return
        with self._lock:
            for r in records:
                self._pending[r.block_hash] = r
        for r in records:
            self._queue.put(("write", r))

    def retain(self, block_hashes: Sequence[bytes], ttl_seconds: float) -> None:
        if self._queue is None:
            self.store.retain(block_hashes, ttl_seconds)
        else:
            self._queue.put(("retain", (list(block_hashes), ttl_seconds)))

    # ------------------------------------------------------------ the writer
    def _write(self, record: PageRecord) -> None:
        try:
            self.store.write(record)
        except OSError as exc:   # disk full, permissions: the page stays RAM-only
            log.warning("KV warehouse: cannot write a page: %s", exc)

    def _writer(self) -> None:
        assert self._queue is not None
        while True:
            kind, item = self._queue.get()
            try:
                if kind == "write":
                    self._write(item)
                    with self._lock:
                        self._pending.pop(item.block_hash, None)
                elif kind == "retain":
                    self.store.retain(*item)
                elif kind == "flush":
                    item.set()
                elif kind == "stop":
                    return
            except Exception:  # noqa: BLE001 - the writer must outlive one bad page
                log.exception("KV warehouse writer")
            finally:
                self._queue.task_done()

    def flush(self) -> None:
        """Wait until every page saved so far is on disk."""
        if self._queue is not None:
            done = threading.Event()
            self._queue.put(("flush", done))
            done.wait()

    def close(self) -> None:
        """Write what is pending, then stop the writer thread."""
        if self._queue is not None and self._thread is not None and self._thread.is_alive():
            self._queue.put(("stop", None))
            self._thread.join()

    def stats(self) -> dict[str, int]:
        s = asdict(self.store.stats)
        s.update(pages_loaded=self.pages_loaded, dropped_saves=self.dropped_saves,
                 pending=len(self._pending))
        return s
