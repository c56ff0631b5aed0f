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
- ``prefetch`` (a request was queued and its prefix misses RAM): a reader thread reads and
  verifies those pages ahead of time into a bounded read-ahead buffer, so the ``load`` at
  admission only copies them into the KV cache instead of waiting for the files. A full
  buffer stops the read-ahead (pages for requests queued earlier are needed sooner) unless
  it holds pages nobody loaded for a minute. A ``load``
  that reaches a page the reader is working on waits for it; one the reader has not started
  is read by ``load`` itself (and dropped from the reader's list).

Write-through (rather than writing on RAM eviction) is what lets a page survive ``kill -9``
and be read by another process on the same directory at once.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import asdict
from typing import Sequence

import numpy as np
import torch

from tokenfactory.engine.kv_connector import KVPageIO
from tokenfactory.engine.warehouse.store import PageRecord, PageStore
from tokenfactory.model.kv_pages import as_numpy_bits

log = logging.getLogger(__name__)

PREFETCH_MAX_AGE = 60.0   # seconds a read-ahead page waits for its load before it may be dropped


class WarehouseConnector:
    def __init__(self, store: PageStore, kv_io: KVPageIO, page_shape: Sequence[int],
                 dtype: torch.dtype, *, async_writes: bool = True, max_pending: int = 256,
                 prefetch_bytes: int = 256 << 20):
        self.store = store
        self.kv_io = kv_io
        self.page_shape = tuple(page_shape)          # (num_layers, 2, Hkv, block_size, D)
        self.dtype = dtype
        self.page_bytes = math.prod(self.page_shape) * torch.empty((), dtype=dtype).element_size()
        self.max_pending = max_pending
        self.dropped_saves = 0
        self.pages_loaded = 0
        self._pending: dict[bytes, PageRecord] = {}
        self._lock = threading.Lock()                # guards _pending and the read-ahead state
        # read-ahead (``prefetch``): verified pages waiting for their ``load``, oldest first,
        # at most ``prefetch_bytes`` of them; hashes the reader is reading now; hashes it was
        # asked for and has not started (a ``load`` that gets there first takes them off)
        self.prefetch_bytes = prefetch_bytes
        self.pages_prefetched = 0     # pages the reader read and verified
        self.prefetch_hits = 0        # loaded pages the reader had already read
        self.prefetch_dropped = 0     # read-ahead pages dropped unused (stale)
        self.prefetch_skipped = 0     # pages not read ahead: the buffer was full
        # hash -> (page, monotonic time read), oldest first
        self._ready: OrderedDict[bytes, tuple[PageRecord, float]] = OrderedDict()
        self._ready_bytes = 0
        self._reading: set[bytes] = set()
        self._asked: set[bytes] = set()
        self._read_done = threading.Condition(self._lock)
        self._reads: queue.Queue | None = None       # prefetch jobs; reader started on demand
        self._reader: threading.Thread | None = None
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
            rec = self._in_memory(h)
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

    def _in_memory(self, h: bytes) -> PageRecord | None:
        """The page if it is waiting to be written or was read ahead (waiting for the reader
        when it is reading it right now); None: ``load`` reads the file itself."""
        with self._lock:
            rec = self._pending.get(h)
            if rec is not None:
                return rec
            while h in self._reading:
                self._read_done.wait()
            entry = self._ready.pop(h, None)
            if entry is None:
                self._asked.discard(h)      # read here: the reader need not
                return None
            rec = entry[0]
            self._ready_bytes -= len(rec.payload)
            self.prefetch_hits += 1
            return rec

    # -------------------------------------------------------------- read-ahead
    def prefetch(self, block_hashes: Sequence[bytes],
                 token_ids_per_block: Sequence[Sequence[int]],
                 parent_hash: bytes | None = None) -> None:
        """Start reading these pages (a chain following ``parent_hash``) in the background,
        so a later ``load`` of them finds them read and verified. Returns at once."""
        with self._lock:
            todo = [i for i, h in enumerate(block_hashes)
                    if h not in self._pending and h not in self._ready and h not in self._reading]
            if not todo:
                return
            self._asked.update(block_hashes[i] for i in todo)
            if self._reads is None:
                self._reads = queue.Queue()
                self._reader = threading.Thread(target=self._read_ahead, daemon=True,
                                                name="kv-warehouse-reader")
                self._reader.start()
        self._reads.put((list(block_hashes), [tuple(t) for t in token_ids_per_block],
                         parent_hash))

    def _read_ahead(self) -> None:
        assert self._reads is not None
        while True:
            job = self._reads.get()
            try:
                if job is None:
                    return
                self._read_chain(*job)
            except Exception:  # noqa: BLE001 - the reader must outlive one bad job
                log.exception("KV warehouse reader")
            finally:
                self._reads.task_done()

    def _make_room(self) -> bool:
        """Room for one more page in the read-ahead buffer (under the lock), dropping pages
        nobody loaded within ``PREFETCH_MAX_AGE`` seconds (their request was aborted, or
        another request brought them into RAM)."""
        if self._ready_bytes + self.page_bytes <= self.prefetch_bytes:
            return True
        stale = time.monotonic() - PREFETCH_MAX_AGE
        while self._ready and next(iter(self._ready.values()))[1] < stale:
            _, (old, _) = self._ready.popitem(last=False)
            self._ready_bytes -= len(old.payload)
            self.prefetch_dropped += 1
        return self._ready_bytes + self.page_bytes <= self.prefetch_bytes

    def reading(self, block_hashes: Sequence[bytes]) -> bool:
        """Whether the reader still has any of these pages to read (a scheduler may admit
        other requests first, so the read overlaps their step)."""
        with self._lock:
            return any(h in self._asked or h in self._reading for h in block_hashes)

    def wait_prefetched(self) -> None:
        """Wait until every ``prefetch`` asked so far has been read (tests, benchmarks)."""
        if self._reads is not None:
            self._reads.join()

    def _read_chain(self, hashes: list[bytes], tokens: list[tuple[int, ...]],
                    parent: bytes | None) -> None:
        prev = parent
        for h, toks in zip(hashes, tokens):
            with self._lock:
                if h not in self._asked:     # loaded, being loaded, or read by another job
                    prev = h
                    continue
                if not self._make_room():
                    # full of pages queued requests will load soon: the rest of this chain
                    # is read at its admission instead (never evict what is needed sooner)
                    left = self._asked.intersection(hashes)
                    self.prefetch_skipped += len(left)
                    self._asked.difference_update(left)
                    return
                self._asked.discard(h)
                self._reading.add(h)
            rec = None
            try:
                rec = self.store.read(h, toks, prev, check_parent=True)
                if rec is not None and len(rec.payload) != self.page_bytes:
                    rec = None
            finally:
                with self._lock:
                    self._reading.discard(h)
                    if rec is not None:
                        self._ready[h] = (rec, time.monotonic())
                        self._ready_bytes += len(rec.payload)
                        self.pages_prefetched += 1
                    self._read_done.notify_all()
            if rec is None:                  # the chain ends here: later pages are unusable
                with self._lock:
                    self._asked.difference_update(hashes)
                return
            prev = h

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
        """Write what is pending, then stop the writer and reader threads."""
        if self._queue is not None and self._thread is not None and self._thread.is_alive():
            self._queue.put(("stop", None))
            self._thread.join()
        if self._reads is not None and self._reader is not None and self._reader.is_alive():
            self._reads.put(None)
            self._reader.join()

    def stats(self) -> dict[str, int]:
        s = asdict(self.store.stats)
        s.update(pages_loaded=self.pages_loaded, dropped_saves=self.dropped_saves,
                 pending=len(self._pending), pages_prefetched=self.pages_prefetched,
                 prefetch_hits=self.prefetch_hits, prefetch_dropped=self.prefetch_dropped,
                 prefetch_skipped=self.prefetch_skipped)
        return s
