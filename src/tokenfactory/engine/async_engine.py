"""AsyncEngine: drives EngineCore from a dedicated thread so the HTTP event loop never waits
on a forward pass. Each request gets an asyncio.Queue of RequestOutputs; cancelling the consumer
(a client that disconnects) aborts the request and frees its pages at once.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

from tokenfactory.engine.core import EngineCore
from tokenfactory.engine.request import CacheBreakpoint, RequestOutput
from tokenfactory.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full; the client should retry later."""


class EngineDeadError(RuntimeError):
    """The engine thread has died; the server must be restarted."""


class PendingOutput:
    """A request's newest output not yet taken by its consumer, with the deltas (``new_text``,
    ``new_token_ids``) of the outputs it replaced.

    Every RequestOutput is a snapshot carrying the whole token list, text and logprobs so far,
    so a newer one supersedes an older one except for what each added; keeping only the newest
    plus the concatenated deltas bounds what waits for a slow consumer to one output per
    request (the same merging as vLLM's output collector). The async engine uses it between
    its thread and the event loop, and the HTTP layer between the event loop and a slow
    client. The deltas are joined once, on ``take``, not on every merge."""

    __slots__ = ("latest", "_texts", "_ids")

    def __init__(self) -> None:
        self.latest: RequestOutput | None = None
        self._texts: list[str] = []
        self._ids: list[int] = []

    def add(self, out: RequestOutput) -> None:
        comp = out.outputs[0]
        self._texts.append(comp.new_text)
        self._ids.extend(comp.new_token_ids)
        self.latest = out

    def take(self) -> RequestOutput:
        """The merged output (the newest snapshot with every delta since the last take)."""
        out, texts, ids = self.latest, self._texts, self._ids
        if out is None:
            raise LookupError("no pending output")
        self.latest, self._texts, self._ids = None, [], []
        if len(texts) > 1:   # several outputs merged: one delta covering all of them
            comp = dataclasses.replace(out.outputs[0], new_text="".join(texts), new_token_ids=ids)
            out = dataclasses.replace(out, outputs=[comp])
        return out

    def __bool__(self) -> bool:
        return self.latest is not None


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_free: int
    kv_blocks_pinned: int
    prefix_cache_queries: int
    prefix_cache_hits: int          # every tier: RAM pages and pages the connector loaded
    num_steps: int
    # The KV connector's tier (disk warehouse, remote KV), in tokens; 0 without a connector.
    connector_queries: int = 0      # tokens asked of it after a RAM miss
    connector_hits: int = 0         # tokens it supplied (part of prefix_cache_hits)


@dataclass(frozen=True)
class SpecDecodeCounts:
    """One proposer's speculative-decoding counters (vLLM's meanings): verification steps
    that carried drafts, draft tokens proposed, draft tokens accepted."""
    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int


class AsyncEngine:
    """``max_queued_requests`` bounds the whole waiting queue; ``max_queued_per_tenant`` bounds
    each tenant's share of it (checked atomically in ``generate``, EngineOverloadedError when
    full), so one API key cannot fill the queue for everyone. Admission from the queue is
    round robin by tenant (see ``Scheduler``)."""

    def __init__(self, core: EngineCore, *, max_queued_requests: int | None = None,
                 max_queued_per_tenant: int | None = None):
        self.core = core
        self.max_queued_requests = max_queued_requests
        self.max_queued_per_tenant = max_queued_per_tenant
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        # per request: items awaiting the event loop (exceptions, or a PendingOutput)
        self._undelivered: dict[str, list] = {}
        self._lock = threading.Lock()
        self._pending_adds = 0
        self._pending_by_tenant: dict[str | None, int] = {}   # adds not yet in the core
        self._stop = False
        self.dead_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tokenfactory-engine", daemon=True)
        self._started = False

    # ----------------------------------------------------------------- control
    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop = True
        self._wakeup.set()
        if self._started:
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self.dead_error is None and (not self._started or self._thread.is_alive())

    def num_in_flight(self) -> int:
        with self._lock:
            return len(self._streams)

    def num_waiting_for(self, tenant: str | None) -> int:
        """Requests of ``tenant`` queued and not yet admitted (including ones submitted but
        not yet handed to the engine thread): what a per-tenant queue limit compares."""
        with self._lock:
            return self.core.num_waiting_for(tenant) + self._pending_by_tenant.get(tenant, 0)

    def stats(self) -> EngineStats:
        kv = self.core.kv
        # KVCacheManager.stats(): the pool's counters plus the connector tier's
        s = kv.stats() if hasattr(kv, "stats") else kv.pool.stats()
        return EngineStats(self.core.num_running, self.core.num_waiting + self._pending_adds,
                           s.num_blocks, s.num_free, s.num_pinned, s.prefix_queries,
                           s.prefix_hits, self.core.num_steps,
                           connector_queries=getattr(s, "connector_queries", 0),
                           connector_hits=getattr(s, "connector_hits", 0))

    @property
    def has_kv_connector(self) -> bool:
        """True when a second KV tier (a connector) sits behind the RAM prefix cache."""
        return getattr(self.core.kv, "connector", None) is not None

    def spec_decode_stats(self) -> dict[str, SpecDecodeCounts]:
        """Speculative-decoding counters per proposer name; {} when the engine does not
        speculate (or predates ``EngineCore.spec_stats``)."""
        stats = getattr(self.core, "spec_stats", None) or {}
        return {name: SpecDecodeCounts(int(c.num_drafts), int(c.num_draft_tokens),
                                       int(c.num_accepted_tokens))
                for name, c in list(stats.items())}

    # ---------------------------------------------------------------- requests
    async def generate(self, request_id: str, prompt_token_ids: Sequence[int],
                       sampling_params: SamplingParams, *, prompt: str | None = None,
                       cache_salt: str | None = None,
                       cache_breakpoints: Sequence[CacheBreakpoint] = (),
                       tenant: str | None = None) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs until it finishes.

        Raises AdmissionError (can never fit), EngineOverloadedError (queue full, or this
        tenant's share of it) or EngineDeadError before the first output; all of them leave
        no state behind. A request that fails in the engine (its forward pass or its sampling)
        ends with an output whose ``finished`` is set, ``outputs[0].finish_reason == "error"``
        and ``error`` holding the reason; its batch-mates are unaffected.
        """
        if self.dead_error is not None:
            raise EngineDeadError(f"engine is not running: {self.dead_error}")
        self.core.check_admissible(len(prompt_token_ids), sampling_params.max_tokens)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if (self.max_queued_requests is not None
                    and self.core.num_waiting + self._pending_adds >= self.max_queued_requests):
                raise EngineOverloadedError(
                    f"{self.max_queued_requests} requests are already queued")
            if (self.max_queued_per_tenant is not None
                    and self.core.num_waiting_for(tenant)
                    + self._pending_by_tenant.get(tenant, 0) >= self.max_queued_per_tenant):
                raise EngineOverloadedError(
                    f"{self.max_queued_per_tenant} requests of this tenant are already queued")
            if request_id in self._streams:
                raise ValueError(f"duplicate request id {request_id!r}")
            self._streams[request_id] = (loop, q)
            self._pending_adds += 1
            self._pending_by_tenant[tenant] = self._pending_by_tenant.get(tenant, 0) + 1
        self._commands.put(("add", request_id, list(prompt_token_ids), sampling_params,
                            prompt, cache_salt, tuple(cache_breakpoints), tenant))
        self._wakeup.set()
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)
            with self._lock:
                self._streams.pop(request_id, None)
                self._undelivered.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wakeup.set()

    # ------------------------------------------------------------ engine thread
    def _deliver(self, request_id: str, item) -> None:
        """Hand ``item`` to the request's consumer. While an earlier hand-over to the event loop
        is still pending, a newer output replaces the pending one with the deltas merged in
        (outputs carry cumulative token ids, text and logprobs plus what the update added):
        an engine faster than its consumer then queues at most one output per request rather
        than one per step, each holding a full copy of the tokens so far."""
        with self._lock:
            entry = self._streams.get(request_id)
            if entry is None:
                return
            items = self._undelivered.get(request_id)
            last = items[-1] if items else None
            if isinstance(last, PendingOutput) and isinstance(item, RequestOutput) \
                    and not last.latest.finished:
                last.add(item)   # a hand-over is already scheduled: merge into it
                return
            if isinstance(item, RequestOutput):
                pending = PendingOutput()
                pending.add(item)
                item = pending
            if items:   # after an exception or a finished output: kept apart
                items.append(item)
                return
            self._undelivered[request_id] = [item]
        loop, q = entry
        try:
            loop.call_soon_threadsafe(self._hand_over, request_id, q)
        except RuntimeError:  # the consumer's loop is closed
            pass

    def _hand_over(self, request_id: str, q: asyncio.Queue) -> None:
        """On the consumer's event loop: move what accumulated for the request into its queue."""
        with self._lock:
            items = self._undelivered.pop(request_id, ())
        for item in items:
            q.put_nowait(item.take() if isinstance(item, PendingOutput) else item)

    def _handle_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, ids, params, prompt, salt, bps, tenant = cmd
                try:
                    with self._lock:
                        wanted = rid in self._streams
                    if not wanted:  # the client left before we got to it
                        continue
                    self.core.add_request(rid, ids, params, prompt=prompt, cache_salt=salt,
                                          cache_breakpoints=bps, tenant=tenant)
                except Exception as exc:  # noqa: BLE001 - reported to that request only
                    self._deliver(rid, exc)
                finally:
                    # the request now counts in the core's queue (or nowhere): not pending
                    with self._lock:
                        self._pending_adds -= 1
                        n = self._pending_by_tenant[tenant] - 1
                        if n:
                            self._pending_by_tenant[tenant] = n
                        else:
                            del self._pending_by_tenant[tenant]
            else:
                self.core.abort(cmd[1])

    def _run(self) -> None:
        try:
            while not self._stop:
                self._handle_commands()
                if not self.core.has_unfinished_requests():
                    self._wakeup.wait(0.5)
                    self._wakeup.clear()
                    continue
                for out in self.core.step():
                    self._deliver(out.request_id, out)
        except BaseException as exc:  # noqa: BLE001 - the engine is dead; tell everyone
            log.exception("engine thread died")
            self.dead_error = exc
            with self._lock:
                rids = list(self._streams)
            for rid in rids:
                self._deliver(rid, EngineDeadError(f"engine failed: {exc}"))
