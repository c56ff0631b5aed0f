"""The warehouse's page files on their own (issue 18): checks on read, the byte budget with LRU
and TTL retention, and concurrent writers in real processes."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from tokenfactory.engine.block_pool import hash_block
from tokenfactory.engine.warehouse.store import PageRecord, PageStore

FP = b"f" * 16
PAYLOAD = 1000


def record(i: int, parent: bytes | None = None) -> PageRecord:
    toks = (i, i + 1, i + 2, i + 3)
    return PageRecord(hash_block(parent, toks), parent, toks, bytes([i % 256]) * PAYLOAD)


def file_size(rec: PageRecord) -> int:
    return len(PageStore.encode(rec, FP))


def test_a_page_reads_back_only_when_everything_matches(tmp_path):
    store = PageStore(tmp_path, FP, max_bytes=1 << 20)
    a = record(1)
    b = record(2, a.block_hash)
    assert store.write(a) and store.write(b)
    assert not store.write(a)                       # already there
    assert store.read(a.block_hash, a.token_ids) == a
    assert store.read(b.block_hash, b.token_ids, a.block_hash, check_parent=True) == b
    # wrong tokens or a broken chain: rejected and deleted, then a plain miss
    assert store.read(b.block_hash, (9, 9, 9, 9)) is None
    assert not store.contains(b.block_hash)
    assert store.write(b)
    assert store.read(b.block_hash, b.token_ids, b"x" * 16, check_parent=True) is None
    assert store.stats.rejected == 2
    # another fingerprint (model, dtype, layout, block size) never sees these pages
    other = PageStore(tmp_path, b"g" * 16, max_bytes=1 << 20)
    assert not other.contains(a.block_hash) and other.read(a.block_hash) is None
    # a file under the right name but written for another fingerprint is refused too
    other.write(a)
    os.replace(other.path(a.block_hash), store.path(a.block_hash))
    assert store.read(a.block_hash) is None


def test_byte_budget_evicts_least_recently_used_first(tmp_path):
    now = [1_000_000.0]
    size = file_size(record(0))
    store = PageStore(tmp_path, FP, max_bytes=5 * size, clock=lambda: now[0])
    recs = [record(i) for i in range(8)]
    for r in recs[:5]:
        now[0] += 1
        store.write(r)
    now[0] += 10
    assert store.read(recs[0].block_hash) is not None     # a hit makes page 0 the newest
    now[0] += 10
    store.write(recs[5])                                   # over budget: evict to 90%
    kept = {i for i, r in enumerate(recs) if store.contains(r.block_hash)}
    assert kept == {0, 3, 4, 5}
    assert store.total_bytes() <= 5 * size and store.stats.evicted == 2


def test_ttl_retention_outlives_lru_then_expires(tmp_path):
    """An Anthropic ttl "1h" page stays while newer unretained pages are evicted around it,
    and is reclaimed like any other once the hour is over."""
    now = [1_000_000.0]
    size = file_size(record(0))
    store = PageStore(tmp_path, FP, max_bytes=4 * size, clock=lambda: now[0])
    pinned = record(100)
    store.write(pinned)
    store.retain([pinned.block_hash], 3600.0)
    for i in range(12):
        now[0] += 1
        store.write(record(i))
    assert store.contains(pinned.block_hash)
    assert store.total_bytes() <= 4 * size
    now[0] += 7200                                         # the hour is over
    for i in range(20, 24):
        now[0] += 1
        store.write(record(i))
    assert not store.contains(pinned.block_hash)


def test_concurrent_writers_of_the_same_pages_in_real_processes(tmp_path):
    """Two processes write the same pages over and over while this one reads them: every
    read is a whole valid page or a miss, never a rejected (torn) file."""
    src = textwrap.dedent(f"""
        import sys
        from tokenfactory.engine.block_pool import hash_block
        from tokenfactory.engine.warehouse.store import PageRecord, PageStore
        store = PageStore(sys.argv[1], {FP!r}, max_bytes=1 << 30)
        recs = []
        for i in range(10):
            toks = (i, i + 1, i + 2, i + 3)
            recs.append(PageRecord(hash_block(None, toks), None, toks, bytes([i]) * 100_000))
        for rnd in range(8):
            for r in recs:
                store.write(r)
                if rnd % 3 == 0:
                    import os
                    os.unlink(store.path(r.block_hash))  # forces rewrites while others read
        print("done", flush=True)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", src, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    reader = PageStore(tmp_path, FP, max_bytes=1 << 30)
    hashes = [hash_block(None, (i, i + 1, i + 2, i + 3)) for i in range(10)]
    seen = 0
    while any(p.poll() is None for p in procs):
        for i, h in enumerate(hashes):
            got = reader.read(h, (i, i + 1, i + 2, i + 3))
            if got is not None:
                assert got.payload == bytes([i]) * 100_000
                seen += 1
        time.sleep(0.005)   # leave the writers the cores
    assert [p.communicate(timeout=60)[0].strip() for p in procs] == ["done", "done"]
    assert reader.stats.rejected == 0
    assert seen > 0
    leftovers = [n for _, _, files in os.walk(tmp_path) for n in files if n.endswith(".tmp")]
    assert leftovers == []


@pytest.mark.parametrize("damage", ["truncate", "flip_payload", "flip_token", "empty"])
def test_damaged_files_are_rejected_and_deleted(tmp_path, damage):
    store = PageStore(tmp_path, FP, max_bytes=1 << 20)
    r = record(7)
    store.write(r)
    path = store.path(r.block_hash)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:len(data) // 2]
    elif damage == "flip_payload":
        data[-10] ^= 0x40
    elif damage == "flip_token":
        data[70] ^= 0x01
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    assert store.read(r.block_hash) is None
    assert store.stats.rejected == 1 and not path.exists()


@pytest.mark.parametrize("async_writes", [True, False])
def test_connector_round_trip_whether_or_not_the_writer_has_run(tmp_path, async_writes):
    """Pages saved and loaded straight back are identical, whether they are still queued for
    the writer (served from memory) or already on disk; a chain mismatch stops the load."""
    import torch

    from tokenfactory.engine.warehouse import WarehouseConnector

    L, Hkv, bs, D, blocks = 2, 2, 4, 8, 6
    cache = torch.randn(L, 2, Hkv, blocks, bs, D).to(torch.bfloat16)

    class Pages:      # a KVPageIO over one tensor (layers, K/V, Hkv, blocks, bs, D)
        def read_kv_blocks(self, ids):
            return cache[:, :, :, list(ids)].clone()

        def write_kv_blocks(self, ids, pages):
            cache[:, :, :, list(ids)] = pages

    conn = WarehouseConnector(PageStore(tmp_path, FP, max_bytes=1 << 30), Pages(),
                              (L, 2, Hkv, bs, D), torch.bfloat16, async_writes=async_writes)
    chain, parent, toks = [], None, []
    for i in range(3):
        toks.append([i] * bs)
        parent = hash_block(parent, toks[-1])
        chain.append(parent)
    conn.save(chain, [0, 1, 2], toks)
    assert conn.lookup(chain + [b"z" * 16]) == 3
    want = cache[:, :, :, [0, 1, 2]].clone()
    cache[:, :, :, [3, 4, 5]] = 0
    assert conn.load(chain, [3, 4, 5], toks) == 3
    assert torch.equal(cache[:, :, :, [3, 4, 5]], want)
    assert conn.load([chain[0], chain[2]], [3, 4], [toks[0], toks[2]]) == 1   # broken chain
    assert conn.load(chain, [3, 4, 5], [toks[0], [9] * bs, toks[2]]) == 1     # other tokens
    conn.close()
    assert all(PageStore(tmp_path, FP, max_bytes=1 << 30).contains(h) for h in chain[:1])
