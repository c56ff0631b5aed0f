"""One engine replica as a Ray actor.

The actor owns an ``EngineCore`` built by ``build_engine_core`` and drives it with the same
``AsyncEngine`` the single-process server uses (its own engine thread, per-request streams,
abort on cancel, queue limits). It exposes:

- ``generate(...)``: a Ray streaming generator yielding one ``ReplicaItem`` per engine output
  as it is produced (never a whole response buffered), each carrying the forward-pass time
  charged to that request since the previous item, so the router's cost ledger stays exact;
  a request refused at admission yields a single ``ReplicaRefusal`` instead;
- ``abort(request_id)``;
- ``poll()``: the KV events drained since the last poll plus a stats snapshot, which the
  router applies to its prefix index and load view;
- ``prefill(...)`` / ``receive(pages)``: disaggregated prefill/decode (router/disagg.py): any
  replica can compute a prompt's pages for another, and any can take pages in through its
  ``TransferConnector``.

Ray is imported only by ``start_replicas`` (the class itself is plain Python), so importing
this module costs nothing when no replica is started.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

from tokenfactory.engine.request import CacheBreakpoint, RequestOutput
from tokenfactory.engine.sampling_params import SamplingParams


@dataclass
class ReplicaSpec:
    """How to build each replica's engine (``build_engine_core`` arguments)."""

    model: str                                   # GGUF file or Hugging Face directory
    engine_args: dict[str, Any] = field(default_factory=dict)   # EngineConfig fields
    dtype: str | None = None
    kernels: str | None = "auto"
    quantization: str | None = None              # how a quantized GGUF file's weights run
    kv_cache_dtype: str | None = None            # "auto"/None or "int8" KV pages
    threads: int = 1                             # torch threads (and Ray CPUs) per replica
    max_queued_requests: int | None = None
    max_queued_per_tenant: int | None = None
    # The token warehouse (engine/warehouse): every replica opens the same directory, so a
    # prefix one replica computed is read from disk by another instead of recomputed.
    kv_warehouse: str | None = None
    kv_warehouse_bytes: int | None = None        # its disk budget (None: the default)


@dataclass
class ReplicaInfo:
    """Static facts the router needs before any request (admission limits, page geometry)."""

    block_size: int
    num_blocks: int
    max_model_len: int
    enable_prefix_caching: bool
    kv_cache_bytes_per_block: int
    max_num_batched_tokens: int
    enable_chunked_prefill: bool
    engine_config: Any                           # the replica's EngineConfig
    has_warehouse: bool = False


@dataclass
class ReplicaItem:
    output: RequestOutput
    # (seconds, tokens) of every forward pass that computed tokens of this request since the
    # previous item; seconds already scaled to this request's share of the step.
    charges: list[tuple[float, int]]
    # prompt tokens whose pages came from a prefill replica (counted in
    # output.num_cached_tokens by the engine, though computed for this request)
    transferred_tokens: int = 0


@dataclass
class ReplicaRefusal:
    kind: str          # "admission" | "overloaded" | "dead" | "invalid"
    message: str


@dataclass
class ReplicaPoll:
    incarnation: str                             # new for every actor (re)start
    events: list                                 # engine.kv_events, in order
    stats: Any                                   # engine.async_engine.EngineStats
    alive: bool
    error: str | None


class EngineReplica:
    """The actor body (plain Python; ``start_replicas`` wraps it with ``ray.remote``)."""

    def __init__(self, spec: ReplicaSpec) -> None:
        import uuid

        import torch

        from tokenfactory.engine.async_engine import AsyncEngine
        from tokenfactory.engine.llm import build_engine_core

        torch.set_num_threads(max(1, spec.threads))
        self.incarnation = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._events: list = []
        self._charges: dict[str, list[tuple[float, int]]] = {}
        from tokenfactory.router.disagg import TransferConnector

        core = build_engine_core(spec.model, dtype=spec.dtype, kernels=spec.kernels,
                                 quantization=spec.quantization,
                                 kv_cache_dtype=spec.kv_cache_dtype, **spec.engine_args)
        if hasattr(core.executor, "read_kv_blocks"):
            self.kv_io = core.executor
        else:
            from tokenfactory.model.kv_pages import ModelKVPageIO
            self.kv_io = ModelKVPageIO(core.executor.model)
        self.connector = TransferConnector()
        self.connector.kv_io = self.kv_io
        self.warehouse = None
        if spec.kv_warehouse:
            from tokenfactory.engine.warehouse import DEFAULT_MAX_BYTES, open_warehouse
            from tokenfactory.router.tiers import TieredConnector

            self.warehouse = open_warehouse(
                core.executor, spec.kv_warehouse,
                max_bytes=spec.kv_warehouse_bytes or DEFAULT_MAX_BYTES)
            # pages handed over by a prefill replica first, then the shared disk
            core.kv.attach_connector(TieredConnector([self.connector, self.warehouse]))
        else:
            core.kv.attach_connector(self.connector)
        core.kv.pool.subscribe(self._on_events)
        core.add_step_listener(self._on_step)
        self.core = core
        self.engine = AsyncEngine(core, max_queued_requests=spec.max_queued_requests,
                                  max_queued_per_tenant=spec.max_queued_per_tenant)
        self.engine.start()

    # ------------------------------------------------------- engine thread hooks
    def _on_events(self, events: list) -> None:
        with self._lock:
            self._events.extend(events)

    def _on_step(self, seconds: float, tokens_by_request: dict[str, int]) -> None:
        total = sum(tokens_by_request.values())
        if not total:
            return
        with self._lock:
            for rid, n in tokens_by_request.items():
                pending = self._charges.get(rid)
                if pending is not None:
                    pending.append((seconds * n / total, n))

    def _take_charges(self, request_id: str) -> list[tuple[float, int]]:
        with self._lock:
            pending = self._charges.get(request_id)
            if not pending:
                return []
            self._charges[request_id] = []
            return pending

    # ------------------------------------------------------------ actor methods
    def info(self) -> ReplicaInfo:
        c = self.core
        return ReplicaInfo(c.kv.block_size, c.kv.num_blocks, c.max_model_len,
                           c.kv.pool.enable_prefix_caching,
                           c.executor.kv_cache_bytes_per_block(c.kv.block_size),
                           c.config.max_num_batched_tokens, c.config.enable_chunked_prefill,
                           c.config, self.warehouse is not None)

    def pid(self) -> int:
        import os
        return os.getpid()

    async def generate(self, request_id: str, prompt_token_ids: Sequence[int],
                       sampling_params: SamplingParams, prompt: str | None = None,
                       cache_salt: str | None = None,
                       cache_breakpoints: Sequence[CacheBreakpoint] = (),
                       tenant: str | None = None) -> AsyncIterator[ReplicaItem | ReplicaRefusal]:
        from tokenfactory.engine.async_engine import EngineDeadError, EngineOverloadedError
        from tokenfactory.engine.scheduler import AdmissionError

        with self._lock:
            self._charges[request_id] = []
        try:
            agen = self.engine.generate(request_id, prompt_token_ids, sampling_params,
                                        prompt=prompt, cache_salt=cache_salt,
                                        cache_breakpoints=cache_breakpoints, tenant=tenant)
            started = False
            try:
                bs = self.core.kv.block_size
                async for out in agen:
                    started = True
                    yield ReplicaItem(out, self._take_charges(request_id),
                                      self.connector.loaded_for(request_id) * bs)
            except (AdmissionError, EngineOverloadedError, EngineDeadError, ValueError) as exc:
                if started and not isinstance(exc, EngineDeadError):
                    raise
                # as data, not as an exception: the router raises the API's own error types
                kind = ("admission" if isinstance(exc, AdmissionError) else
                        "overloaded" if isinstance(exc, EngineOverloadedError) else
                        "dead" if isinstance(exc, EngineDeadError) else "invalid")
                yield ReplicaRefusal(kind, str(exc))
            finally:
                await agen.aclose()     # aborts the engine request if it did not finish
        finally:
            self.connector.forget(request_id)
            with self._lock:
                self._charges.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    async def prefill(self, request_id: str, prompt_token_ids: Sequence[int],
                      cache_salt: str | None = None, max_blocks: int | None = None):
        """Compute the prompt's KV here (one sampled token, discarded) and export the pages of
        its full blocks (the first ``max_blocks``) for a decode replica. Two returns (call
        with ``num_returns=2``): (number of blocks, the forward-pass charges of this prefill
        as ``ReplicaItem.charges``, the prompt tokens this replica found in its own cache),
        which the router awaits and books to the request, and
        the ``disagg.PrefixPages``, which it hands on to the decode replica without fetching
        them."""
        from tokenfactory.router.disagg import PrefixPages, export_prefix
        from tokenfactory.router.policy import request_block_hashes

        with self._lock:
            self._charges[request_id] = []
        cached = 0
        try:
            async for out in self.engine.generate(request_id, prompt_token_ids,
                                                  SamplingParams(max_tokens=1),
                                                  cache_salt=cache_salt):
                if out.finished and out.outputs[0].finish_reason in ("error", "abort"):
                    return (0, self._take_charges(request_id), 0), PrefixPages([], [], None)
                cached = max(out.num_cached_tokens, 0)
            hashes = request_block_hashes(list(prompt_token_ids), self.core.kv.block_size,
                                          cache_salt)[:max_blocks]
            pages = export_prefix(self.core, hashes, self.kv_io)
            return (len(pages.block_hashes), self._take_charges(request_id), cached), pages
        finally:
            with self._lock:
                self._charges.pop(request_id, None)

    def receive(self, prefix, request_id: str | None = None) -> tuple[int, float, float]:
        """Take in pages a prefill replica exported for ``request_id``. Returns (blocks,
        seconds the export took, seconds from the export to here: the object store hop, on
        one host's clock)."""
        import time

        arrived = time.time() - prefix.exported_at
        self.connector.receive(prefix, tag=request_id)
        return len(prefix.block_hashes), prefix.seconds, arrived

    def poll(self) -> ReplicaPoll:
        with self._lock:
            events, self._events = self._events, []
        dead = self.engine.dead_error
        return ReplicaPoll(self.incarnation, events, self.engine.stats(), self.engine.is_alive,
                           None if dead is None else str(dead))

    def num_free_blocks(self) -> int:
        return self.core.num_free_blocks()

    def flush(self) -> None:
        """Pages queued for the warehouse reach the disk (other replicas can read them)."""
        if self.warehouse is not None:
            self.warehouse.flush()

    def shutdown(self) -> None:
        self.engine.shutdown()
        if self.warehouse is not None:
            self.warehouse.close()      # pages still queued for writing reach the disk


def init_ray(num_cpus: int | None = None, address: str | None = None,
             object_store_memory: int | None = None) -> None:
    """Start a local Ray runtime on loopback (or join ``address``), once per process.
    ``object_store_memory``: bytes for the object store (prefill -> decode pages go through
    it); None is Ray's default (30% of RAM, allocated as used)."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1", object_store_memory=object_store_memory)


def start_replicas(spec: ReplicaSpec, num_replicas: int, *, max_restarts: int = -1) -> list:
    """``num_replicas`` EngineReplica actors (Ray restarts a dead one up to ``max_restarts``
    times, -1 = always; its in-flight calls fail and the router re-routes or errors them)."""
    import ray

    actor_cls = ray.remote(EngineReplica).options(
        num_cpus=spec.threads, max_restarts=max_restarts, max_task_retries=0,
        max_concurrency=1000)
    return [actor_cls.remote(spec) for _ in range(num_replicas)]
