"""The token warehouse (issue 18): KV pages that outlive RAM, the process and the replica.

A disk tier behind the KV manager's prefix cache. ``store.py`` keeps one self-checking file
per page under a directory (atomic renames, checksums, token ids, a byte budget with LRU and
TTL retention, shared by processes); ``connector.py`` plugs it into the engine as a
``KVConnector``. Usage::

    core = build_engine_core(model, ...)
    core.kv.attach_connector(open_warehouse(core.executor, "/var/cache/tf-kv",
                                            max_bytes=20 << 30))

See docs/kv-cache.md.
"""
from __future__ import annotations

import os

from tokenfactory.engine.warehouse.connector import WarehouseConnector
from tokenfactory.engine.warehouse.store import PageRecord, PageStore, StoreStats
from tokenfactory.model.kv_pages import ModelKVPageIO, model_fingerprint, page_layout

__all__ = ["PageRecord", "PageStore", "StoreStats", "WarehouseConnector", "open_warehouse"]

DEFAULT_MAX_BYTES = 10 << 30


def open_warehouse(executor, directory: str | os.PathLike, *,
                   max_bytes: int = DEFAULT_MAX_BYTES, async_writes: bool = True,
                   fsync: bool = False, prefetch_bytes: int = 256 << 20) -> WarehouseConnector:
    """A warehouse connector for the model a (Torch) executor runs, once its KV cache is
    allocated (after ``EngineCore`` is built). Pages move through the executor's
    ``read_kv_blocks``/``write_kv_blocks`` when it has them, else through
    ``model/kv_pages.py`` over ``executor.model``; they are keyed by the model's fingerprint
    (weights, KV dtype, layout, block size). ``prefetch_bytes`` bounds the read-ahead buffer."""
    model = executor.model
    kv_io = executor if hasattr(executor, "read_kv_blocks") else ModelKVPageIO(model)
    shape, dtype = page_layout(model)
    store = PageStore(directory, model_fingerprint(model), max_bytes=max_bytes, fsync=fsync)
    return WarehouseConnector(store, kv_io, shape, dtype, async_writes=async_writes,
                              prefetch_bytes=prefetch_bytes)
