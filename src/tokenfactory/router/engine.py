"""RouterEngine: N engine replicas (Ray actors) behind the AsyncEngine interface.

The HTTP layer drives it exactly as it drives one ``AsyncEngine``: ``generate`` (an async
iterator of RequestOutput), ``abort``, ``stats``, ``is_alive`` / ``dead_error``,
``num_in_flight``, ``num_waiting_for``, ``start`` / ``shutdown``, and ``core``: a read-only
view with the attributes the API reads from an EngineCore (page geometry, limits, config,
step listeners; see ``core_view.RouterCoreView``).

Each request is hashed into the block pool's chained block hashes (tenant salt included) and
placed by ``policy.choose_replica`` over the replicas' states: the prefix index built from
their KV events, the requests the router has in flight on each plus those it sent recently
(``policy.RecentLoad``), and their free pages as last polled. The replicas themselves, their
polling and health, are ``fleet.ReplicaFleet``, which this class extends.

Faults: when the replica serving a request dies or hangs, the request is re-routed to another
replica if it had produced no output yet; one already streaming ends with ``EngineDeadError``
(the API turns it into a protocol error event).

Disaggregated prefill/decode (``prefill_actors``): the policy picks the decode replica; unless
it already holds the prompt's blocks, a prefill replica (in turn) computes them and the pages
move to the decode replica through Ray's object store (router/disagg.py); ``transfers``
records each hand-over.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

from tokenfactory.engine.async_engine import EngineDeadError, EngineOverloadedError
from tokenfactory.engine.request import CacheBreakpoint, RequestOutput
from tokenfactory.engine.sampling_params import SamplingParams
from tokenfactory.engine.scheduler import AdmissionError, check_admission
from tokenfactory.router.core_view import RouterCoreView
from tokenfactory.router.disagg import TransferRecord, TransferTotals, bill_transfer
from tokenfactory.router.fleet import ReplicaFleet
from tokenfactory.router.policy import (POLICIES, LoadBound, NoHealthyReplicaError, RecentLoad,
                                        RoundRobin, choose_replica, matched_blocks,
                                        request_block_hashes)
from tokenfactory.router.replica import ReplicaInfo, ReplicaItem, ReplicaRefusal, ReplicaSpec

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    tenant: str | None
    replica: int = -1
    started: bool = False
    finished: bool = False


class RouterEngine(ReplicaFleet):
    def __init__(self, actors: list, infos: list[ReplicaInfo], *, policy: str = "prefix",
                 tokenizer=None, bound: LoadBound = LoadBound(), poll_interval: float = 0.02,
                 recent_half_life: float = 5.0, hang_timeout: float = 30.0,
                 prefill_timeout_per_block: float = 1.0,
                 prefill_actors: Sequence = (),
                 owns_replicas: bool = True, owns_ray: bool = False):
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; choose one of "
                             f"{', '.join(POLICIES)}")
        super().__init__(actors, infos, poll_interval=poll_interval, hang_timeout=hang_timeout,
                         prefill_actors=prefill_actors, owns_replicas=owns_replicas,
                         owns_ray=owns_ray)
        self.policy = policy
        self.bound = bound
        # a prefill replica gets hang_timeout + this per block of the prompt to answer
        self.prefill_timeout_per_block = prefill_timeout_per_block
        self._next_prefill = 0
        self.transfers: deque[TransferRecord] = deque(maxlen=1000)   # the latest ones
        self.transfer_totals = TransferTotals()
        self._rr = RoundRobin()
        self._recent = RecentLoad(len(actors), recent_half_life)
        self._streams: dict[str, _Stream] = {}
        self.core = RouterCoreView(self.info, self.stats, tokenizer)
        self.max_queued_requests: int | None = None   # queue limits live in the replicas

    # ----------------------------------------------------------------- build
    @classmethod
    def launch(cls, spec: ReplicaSpec, num_replicas: int, *, policy: str = "prefix",
               num_prefill_replicas: int = 0, ray_address: str | None = None,
               num_cpus: int | None = None, tokenizer=None, **kwargs) -> "RouterEngine":
        """Start a local Ray runtime (or join ``ray_address``), ``num_replicas`` replicas of
        ``spec`` (the decode replicas when ``num_prefill_replicas`` > 0: disaggregated
        prefill/decode), and a router over them. ``tokenizer``: the HTTP side's (loaded from
        ``spec.model`` when None)."""
        import ray

        from tokenfactory.router.replica import init_ray, start_replicas

        total = num_replicas + num_prefill_replicas
        owns = not ray.is_initialized() and ray_address is None
        init_ray(num_cpus if num_cpus is not None else total * spec.threads, ray_address)
        actors = start_replicas(spec, total)
        infos = ray.get([a.info.remote() for a in actors])
        if tokenizer is None:
            tokenizer = load_tokenizer(spec.model)
        return cls(actors[num_prefill_replicas:], infos[num_prefill_replicas:], policy=policy,
                   tokenizer=tokenizer, prefill_actors=actors[:num_prefill_replicas],
                   owns_ray=owns, **kwargs)

    # -------------------------------------------------------------- requests
    def num_in_flight(self) -> int:
        with self._lock:
            return len(self._streams)

    def num_waiting_for(self, tenant: str | None) -> int:
        """Requests of ``tenant`` submitted through this router that have no output yet."""
        with self._lock:
            return sum(1 for s in self._streams.values() if s.tenant == tenant and not s.started)

    def check_admissible(self, num_prompt_tokens: int, max_tokens: int | None) -> None:
        """The replicas' admission rule (engine.scheduler.Scheduler.check_admissible), checked
        here so a request that no replica could ever serve is refused before it is placed."""
        info = self.info
        check_admission(num_prompt_tokens, max_tokens, max_model_len=info.max_model_len,
                        block_size=info.block_size, num_blocks=info.num_blocks,
                        max_num_batched_tokens=info.max_num_batched_tokens,
                        enable_chunked_prefill=info.enable_chunked_prefill)

    def route(self, prompt_token_ids: Sequence[int], cache_salt: str | None = None,
              exclude: Sequence[int] = ()) -> int:
        """The replica the policy picks for this prompt now (``exclude``: skip these)."""
        hashes = request_block_hashes(prompt_token_ids, self.info.block_size, cache_salt) \
            if self.policy == "prefix" else []
        now = time.monotonic()
        with self._lock:
            for i, (st, r) in enumerate(zip(self._states, self.replicas)):
                st.healthy = r.healthy and i not in exclude
                st.queue_depth = r.in_flight
                st.recent = self._recent.get(i, now)
            ri = choose_replica(hashes, self._states, self.policy, round_robin=self._rr,
                                bound=self.bound)
            self._recent.add(ri, now)
            return ri

    async def generate(self, request_id: str, prompt_token_ids: Sequence[int],
                       sampling_params: SamplingParams, *, prompt: str | None = None,
                       cache_salt: str | None = None,
                       cache_breakpoints: Sequence[CacheBreakpoint] = (),
                       tenant: str | None = None) -> AsyncIterator[RequestOutput]:
        """As ``AsyncEngine.generate``: AdmissionError / EngineOverloadedError /
        EngineDeadError before the first output; EngineDeadError after it when the replica
        serving the request dies."""
        from ray.exceptions import RayActorError

        if not self.is_alive:
            raise EngineDeadError(f"no replica is running: {self.dead_error}")
        self.check_admissible(len(prompt_token_ids), sampling_params.max_tokens)
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"duplicate request id {request_id!r}")
            stream = self._streams[request_id] = _Stream(tenant)
        ids = list(prompt_token_ids)
        tried: list[int] = []
        try:
            while True:
                try:
                    ri = self.route(ids, cache_salt, exclude=tried)
                except NoHealthyReplicaError:
                    raise EngineDeadError("every replica is down") from None
                stream.replica = ri
                view = self.replicas[ri]
                with self._lock:
                    view.in_flight += 1
                    view.routed += 1
                try:
                    prefill_cached = 0
                    if self.prefill_actors:
                        prefill_cached = await self._prefill_elsewhere(request_id, ids,
                                                                       cache_salt, ri)
                    gen = self.actors[ri].generate.options(num_returns="streaming").remote(
                        request_id, ids, sampling_params, prompt, cache_salt,
                        tuple(cache_breakpoints), tenant)
                    async for item in self._items(gen, ri):
                        if isinstance(item, ReplicaRefusal):
                            if item.kind == "dead":     # its engine thread died
                                raise _ReplicaGone(item.message)
                            raise _refusal_error(item)
                        assert isinstance(item, ReplicaItem)
                        stream.started = True
                        self.core.charge(request_id, item.charges)
                        out = item.output
                        if item.transferred_tokens:
                            out = bill_transfer(out, item.transferred_tokens, prefill_cached)
                        stream.finished = out.finished
                        yield out
                        if stream.finished:
                            return
                    raise EngineDeadError(f"replica {ri} ended request {request_id} early")
                except (RayActorError, _ReplicaGone) as exc:
                    self._mark_dead(ri, exc)
                    if stream.started:
                        raise EngineDeadError(f"replica {ri} failed: {exc}") from None
                    tried.append(ri)       # nothing was sent yet: place it elsewhere
                finally:
                    with self._lock:
                        view.in_flight -= 1
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            ri = stream.replica
            if not stream.finished and ri >= 0 and self.replicas[ri].healthy:
                self.actors[ri].abort.remote(request_id)   # the client left: free its pages

    async def _items(self, gen, ri: int) -> AsyncIterator:
        """The items of a replica's stream as they come; ``_ReplicaGone`` as soon as the router
        finds the replica dead or hung (a hung replica's stream would otherwise never end)."""
        view = self.replicas[ri]
        deaths = view.deaths

        async def next_item():
            return await (await gen.__anext__())

        while True:
            nxt = asyncio.ensure_future(next_item())
            try:
                while not (await asyncio.wait({nxt}, timeout=0.25))[0]:
                    if view.deaths != deaths:
                        raise _ReplicaGone(f"replica {ri} is down: {view.error}")
            except BaseException:
                nxt.cancel()
                raise
            try:
                item = nxt.result()
            except StopAsyncIteration:
                return
            yield item

    async def _prefill_elsewhere(self, request_id: str, ids: list[int], cache_salt: str | None,
                                 decode: int) -> int:
        """Compute the prompt on a prefill replica and move its pages to replica ``decode``,
        unless that replica already holds them. Returns the prompt tokens the prefill replica
        found in its own cache (0 if none ran)."""
        hashes = request_block_hashes(ids, self.info.block_size, cache_salt)
        usable = (len(ids) - 1) // self.info.block_size   # the last token is always recomputed
        if matched_blocks(hashes, self.index[decode]) >= usable:
            return 0
        prefill = self.prefill_actors[self._next_prefill % len(self.prefill_actors)]
        self._next_prefill += 1
        from ray.exceptions import RayActorError

        # the pages go prefill -> decode through Ray's object store, not through this process
        count_ref, pages_ref = prefill.prefill.options(num_returns=2).remote(
            f"{request_id}-prefill", ids, cache_salt, usable)
        # Prefill replicas are not polled: a hung one is bounded here instead (generously: a
        # long prompt takes many steps), and the decode replica computes the prompt itself.
        limit = self.prefill_timeout_per_block * max(1, usable) + self.hang_timeout
        try:
            count, charges, cached = await asyncio.wait_for(count_ref, limit)
            self.core.charge(request_id, charges)   # the prefill's machine time is this request's
            if not count:
                return 0
        except (RayActorError, asyncio.TimeoutError) as exc:
            log.warning("prefill replica failed (%s); decoding replica computes the prompt",
                        exc or f"no answer in {limit:.0f} s")
            prefill.abort.remote(f"{request_id}-prefill")
            return 0
        n, export_s, hop_s = await self.actors[decode].receive.remote(pages_ref, request_id)
        record = TransferRecord(n * self.info.block_size, export_s, hop_s)
        self.transfers.append(record)
        self.transfer_totals.add(record)
        return cached

    def abort(self, request_id: str) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        ri = stream.replica if stream is not None else -1
        targets = [ri] if ri >= 0 else range(len(self.actors))
        for i in targets:
            try:
                self.actors[i].abort.remote(request_id)
            except Exception:  # noqa: BLE001 - a dead replica has nothing to abort
                pass


class _ReplicaGone(RuntimeError):
    """The replica's engine is dead though its actor answers (handled like a dead actor)."""


def _refusal_error(r: ReplicaRefusal) -> BaseException:
    if r.kind == "admission":
        return AdmissionError(r.message)
    if r.kind == "overloaded":
        return EngineOverloadedError(r.message)
    if r.kind == "dead":
        return EngineDeadError(r.message)
    return ValueError(r.message)


def load_tokenizer(model: str):
    """The tokenizer of ``model`` (GGUF file or HF directory), for the HTTP side."""
    from tokenfactory.model.gguf import is_gguf_file, open_gguf
    from tokenfactory.text.tokenizer import Tokenizer

    if is_gguf_file(model):
        return Tokenizer.from_gguf(model, reader=open_gguf(model).reader)
    return Tokenizer.from_pretrained(model)
