"""The warehouse's files: one self-checking file per KV page, in a directory many processes share.

Layout: ``ROOT/<fingerprint hex>/<first hash byte hex>/<block hash hex>.kvp``. The
fingerprint (``model/kv_pages.model_fingerprint``: weights, dtype, KV layout, block size)
is part of the path *and* of every file's header, so pages of another model, dtype or block
size are never found, let alone served.

A page file is::

    header   "<8s16s16s16sIQ": magic, fingerprint, block hash, parent hash, n_tokens, payload len
    tokens   n_tokens x int64 (the block's token ids)
    payload  the page bytes (num_layers, 2, Hkv, block_size, D) in the cache dtype
    trailer  crc32 of everything above, uint32

Durability: a page is written to a temporary file in the same directory and renamed over its
final name, so a reader (or a restart after ``kill -9``) sees a whole file or none. A torn,
truncated, corrupted or misplaced file fails the length, magic, hash, token or checksum check
on read, is deleted, and reads as a miss; the caller recomputes the page.

Recency and retention live in the file's mtime: a hit sets it to now, a retention (Anthropic
``ttl: "1h"``) sets it to the expiry time, in the future. Eviction, when the directory
exceeds its byte budget, deletes files in mtime order: least recently used first, retained
pages last (soonest expiry first), and a page whose retention has expired counts as used at its
expiry time, so it is reclaimed like any other. Several processes may share a directory: all
of this is plain files, atomic renames and unlink-tolerant reads.
"""
from __future__ import annotations

import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

MAGIC = b"TFKVPG01"
HEADER = struct.Struct("<8s16s16s16sIQ")
TRAILER = struct.Struct("<I")
NO_PARENT = b"\x00" * 16
SUFFIX = ".kvp"
STALE_TMP_SECONDS = 600.0   # a temp file this old belongs to a writer that died


@dataclass(frozen=True)
class PageRecord:
    block_hash: bytes
    parent_hash: bytes | None
    token_ids: tuple[int, ...]
    payload: bytes | memoryview  # the page's bytes, opaque here


@dataclass
class StoreStats:
    reads: int = 0              # pages served
    misses: int = 0             # pages asked for and absent
    rejected: int = 0           # files that failed a check (deleted, recomputed)
    writes: int = 0             # pages written
    bytes_written: int = 0
    evicted: int = 0            # files deleted for the byte budget


class PageStore:
    """Pages of one fingerprint under ``root``, with a byte budget over the whole ``root``."""

    def __init__(self, root: str | os.PathLike, fingerprint: bytes, *, max_bytes: int,
                 fsync: bool = False, clock: Callable[[], float] = time.time):
        if len(fingerprint) != 16:
            raise ValueError("the fingerprint must be 16 bytes")
        if max_bytes < 1:
            raise ValueError("the warehouse needs a positive byte budget")
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.dir = self.root / fingerprint.hex()
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.clock = clock            # wall clock: mtimes are shared with other processes
        self.stats = StoreStats()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._bytes = self._scan_and_evict()   # this process's estimate of the total size

    # ------------------------------------------------------------------ paths
    def path(self, block_hash: bytes) -> Path:
        name = block_hash.hex()
        return self.dir / name[:2] / (name + SUFFIX)

    def contains(self, block_hash: bytes) -> bool:
        return self.path(block_hash).is_file()

    # ------------------------------------------------------------------ write
    @staticmethod
    def encode(record: PageRecord, fingerprint: bytes) -> bytes:
        tokens = struct.pack(f"<{len(record.token_ids)}q", *record.token_ids)
        head = HEADER.pack(MAGIC, fingerprint, record.block_hash,
                           record.parent_hash or NO_PARENT, len(record.token_ids),
                           len(record.payload))
        crc = zlib.crc32(record.payload, zlib.crc32(tokens, zlib.crc32(head)))
        return b"".join((head, tokens, record.payload, TRAILER.pack(crc)))

    def write(self, record: PageRecord) -> bool:
        """Store a page atomically (temp file + rename). Returns False when it was already
        there (another process or an earlier step wrote it)."""
        final = self.path(record.block_hash)
        if final.is_file():
            return False
        final.parent.mkdir(exist_ok=True)
        data = self.encode(record, self.fingerprint)
        tmp = final.parent / f".{final.name}.{os.getpid()}.{time.monotonic_ns()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            now = self.clock()
            os.utime(fd, (now, now))   # recency on the store's clock (a test's may be fake)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)   # concurrent writers of one page: identical bytes, last wins
        self.stats.writes += 1
        self.stats.bytes_written += len(data)
        self._bytes += len(data)
        if self._bytes > self.max_bytes:
            self._bytes = self._scan_and_evict()
        return True

    def retain(self, block_hashes: Sequence[bytes], ttl_seconds: float) -> None:
        """Keep these pages at least ``ttl_seconds`` from now: their mtime moves to the expiry
        (never backwards), which puts them behind every unretained page in eviction order."""
        until = self.clock() + ttl_seconds
        for h in block_hashes:
            self._set_mtime_at_least(self.path(h), until)

    def _set_mtime_at_least(self, path: Path, t: float) -> None:
        try:
            st = os.stat(path)
            if st.st_mtime < t:
                os.utime(path, (t, t))
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------- read
    def read(self, block_hash: bytes, token_ids: Sequence[int] | None = None,
             parent_hash: bytes | None = None, *, check_parent: bool = False) -> PageRecord | None:
        """The page stored under ``block_hash`` if it passes every check (and holds exactly
        ``token_ids`` / chains to ``parent_hash`` when given), else None. A file that fails
        a check is deleted."""
        path = self.path(block_hash)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except (FileNotFoundError, IsADirectoryError):
            self.stats.misses += 1
            return None
        record = self._decode(data, block_hash)
        if record is None or (token_ids is not None and record.token_ids != tuple(token_ids)) \
                or (check_parent and record.parent_hash != parent_hash):
            self.stats.rejected += 1
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            return None
        self.stats.reads += 1
        self._set_mtime_at_least(path, self.clock())   # recently used
        return record

    def _decode(self, data: bytes, block_hash: bytes) -> PageRecord | None:
        if len(data) < HEADER.size + TRAILER.size:
            return None
        magic, fp, h, parent, n_tok, n_payload = HEADER.unpack_from(data)
        if (magic != MAGIC or fp != self.fingerprint or h != block_hash
                or len(data) != HEADER.size + 8 * n_tok + n_payload + TRAILER.size):
            return None
        body = memoryview(data)[:len(data) - TRAILER.size]
        if zlib.crc32(body) != TRAILER.unpack_from(data, len(body))[0]:
            return None
        tokens = struct.unpack_from(f"<{n_tok}q", data, HEADER.size)
        start = HEADER.size + 8 * n_tok
        return PageRecord(h, None if parent == NO_PARENT else parent, tokens,
                          body[start:start + n_payload])   # a view: no copy of the page

    # --------------------------------------------------------------- eviction
    def _scan_and_evict(self) -> int:
        """Walk the whole root (every fingerprint shares the budget), delete dead writers'
        temp files, and evict in mtime order down to 90% of the budget when over it. Returns
        the bytes left."""
        now = self.clock()
        entries: list[tuple[float, int, str]] = []
        for fp_dir in _scandir(self.root):
            if not fp_dir.is_dir():
                continue
            for sub in _scandir(fp_dir.path):
                if not sub.is_dir():
                    continue
                for e in _scandir(sub.path):
                    try:
                        st = e.stat()
                    except FileNotFoundError:
                        continue
                    if e.name.endswith(SUFFIX):
                        entries.append((st.st_mtime, st.st_size, e.path))
                    elif e.name.endswith(".tmp") and now - st.st_mtime > STALE_TMP_SECONDS:
                        _unlink(e.path)
        total = sum(size for _, size, _ in entries)
        if total <= self.max_bytes:
            return total
        target = int(self.max_bytes * 0.9)
        entries.sort()
        for _, size, path in entries:
            if total <= target:
                break
            if _unlink(path):
                self.stats.evicted += 1
            total -= size
        return total

    def total_bytes(self) -> int:
        """Bytes of pages under the root right now (a scan; for tests and reports)."""
        return sum(e.stat().st_size for fp in _scandir(self.root) if fp.is_dir()
                   for sub in _scandir(fp.path) if sub.is_dir()
                   for e in _scandir(sub.path) if e.name.endswith(SUFFIX))


def _scandir(path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False   # another process evicted it first
