"""Continuous batching with one token budget per step.

There are no separate prefill and decode phases: every step, running requests get their next
tokens first (one for a decode, a chunk for an unfinished prefill), then waiting requests are
admitted while the budget (``max_num_batched_tokens``) and ``max_num_seqs`` allow. A prompt
longer than the remaining budget is prefilled in chunks that share steps with running decodes.
When pages run out, the most recently admitted running request is preempted: its pages are
freed and it is later recomputed from its prompt plus the tokens it had already produced.

Admission is fair across tenants (:class:`WaitingQueue`): waiting requests are admitted round
robin by tenant, the least recently served tenant first, FIFO within a tenant, so a flood from
one API key cannot starve another's queued requests. With one tenant this is plain FIFO.
Preempted requests resume before any new admission, whoever sent them.

Speculative decoding (a ``proposer``, ``num_speculative_tokens`` > 0): a decoding request may
carry up to K draft tokens proposed from its own context; they count against the step's token
budget and get KV slots like any token, and the slots of drafts the executor rejects are given
back after the step (:meth:`Scheduler.trim_blocks`). Requests with and without drafts share
steps; a request whose drafts do not fit in the pool decodes without them.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterator

from tokenfactory.engine.kv_manager import KVCacheManager, cdiv
from tokenfactory.engine.request import Request, RequestStatus
from tokenfactory.engine.step import NewRequestData, ScheduledRequest, StepPlan
from tokenfactory.model.proposers import Proposer, TokenView


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    enable_chunked_prefill: bool = True
    num_speculative_tokens: int = 0    # K: draft tokens per decoding request (with a proposer)
    # Drafts only in decode-only steps of at most this many rows (decoding requests plus their
    # drafts; 0: no cap, drafts share any step within the token budget). 8 is the native decode step's row limit (kernels.LINEAR_MAX_ROWS):
    # verification then runs the very kernels plain decoding runs, so greedy output stays
    # identical in bfloat16 (drafts verified as a prefill chunk flipped near ties: measured on
    # SmolLM2 at concurrency 8), and past 8 rows every row costs its full compute anyway.
    max_speculative_rows: int = 8


class AdmissionError(ValueError):
    """A request that can never be served with this configuration."""


def check_admission(num_prompt_tokens: int, max_tokens: int | None, *, max_model_len: int,
                    block_size: int, num_blocks: int, max_num_batched_tokens: int,
                    enable_chunked_prefill: bool) -> None:
    """Raise AdmissionError for a request that an engine of this geometry can never serve
    (the scheduler's rule; the router applies the same one to its replicas)."""
    if num_prompt_tokens < 1:
        raise AdmissionError("the prompt is empty: at least one token is needed")
    total = num_prompt_tokens + (max_tokens or 0)
    if total > max_model_len:
        raise AdmissionError(
            f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = {total} "
            f"exceeds the model's context length of {max_model_len} tokens")
    if cdiv(total, block_size) > num_blocks:
        raise AdmissionError(
            f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) needs "
            f"{cdiv(total, block_size)} KV pages but the cache has only "
            f"{num_blocks}; raise kv_cache_memory or lower max_tokens")
    if not enable_chunked_prefill and num_prompt_tokens > max_num_batched_tokens:
        raise AdmissionError(
            f"prompt ({num_prompt_tokens} tokens) exceeds max_num_batched_tokens "
            f"({max_num_batched_tokens}) and chunked prefill is disabled")


class WaitingQueue:
    """Requests waiting for admission: one FIFO per tenant, served round robin.

    ``peek``/``popleft`` give the head of the preempted queue if any (those requests were
    already admitted once: they resume first, most recently preempted first, as before), else
    the head of the tenant served least recently (a tenant new to the queue counts as never
    served; ties go to whoever queued first). Popping a tenant's request moves that tenant to
    the back of the rotation. A tenant's place is forgotten when its queue empties, so state is
    bounded by the tenants that have requests waiting.
    """

    def __init__(self) -> None:
        self._resume: deque[Request] = deque()
        self._queues: dict[str | None, deque[Request]] = {}
        # tenant -> (admission counter when last served, or -1; join order): lowest goes next
        self._rank: dict[str | None, tuple[int, int]] = {}
        self._counts: dict[str | None, int] = {}
        self._served = 0
        self._joined = 0
        self._len = 0   # kept as a plain int: other threads read it while the engine works

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[Request]:
        yield from self._resume
        for q in self._queues.values():
            yield from q

    def count(self, tenant: str | None) -> int:
        """Waiting requests of ``tenant`` (including its preempted ones)."""
        return self._counts.get(tenant, 0)

    def counts(self) -> dict[str | None, int]:
        return dict(self._counts)

    def _inc(self, tenant: str | None, by: int) -> None:
        self._len += by
        n = self._counts.get(tenant, 0) + by
        if n:
            self._counts[tenant] = n
        else:
            del self._counts[tenant]

    def append(self, req: Request) -> None:
        q = self._queues.get(req.tenant)
        if q is None:
            q = self._queues[req.tenant] = deque()
            self._rank[req.tenant] = (-1, self._joined)
            self._joined += 1
        q.append(req)
        self._inc(req.tenant, 1)

    def appendleft(self, req: Request) -> None:
        """A preempted request: it resumes before any new admission."""
        self._resume.appendleft(req)
        self._inc(req.tenant, 1)

    def _next_tenant(self) -> str | None:
        return min(self._rank, key=self._rank.__getitem__)

    def peek(self) -> Request:
        if self._resume:
            return self._resume[0]
        return self._queues[self._next_tenant()][0]

    def popleft(self) -> Request:
        if self._resume:
            req = self._resume.popleft()
        else:
            tenant = self._next_tenant()
            q = self._queues[tenant]
            req = q.popleft()
            if q:
                self._rank[tenant] = (self._served, self._rank[tenant][1])
            else:
                del self._queues[tenant], self._rank[tenant]
            self._served += 1
        self._inc(req.tenant, -1)
        return req

    def remove(self, req: Request) -> None:
        """Remove ``req`` (ValueError when it is not waiting)."""
        try:
            self._resume.remove(req)
        except ValueError:
            q = self._queues.get(req.tenant)
            if q is None:
                raise
            q.remove(req)
            if not q:
                del self._queues[req.tenant], self._rank[req.tenant]
        self._inc(req.tenant, -1)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager,
                 proposer: Proposer | None = None):
        self.config = config
        self.kv = kv
        self.proposer = proposer if config.num_speculative_tokens > 0 else None
        self.waiting = WaitingQueue()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        # Finished since the last plan: the executor drops their state (StepPlan.finished_ids).
        self._finished_ids: list[str] = []

    # ---------------------------------------------------------------- intake
    def check_admissible(self, num_prompt_tokens: int, max_tokens: int | None) -> None:
        cfg = self.config
        check_admission(num_prompt_tokens, max_tokens, max_model_len=cfg.max_model_len,
                        block_size=self.kv.block_size, num_blocks=self.kv.num_blocks,
                        max_num_batched_tokens=cfg.max_num_batched_tokens,
                        enable_chunked_prefill=cfg.enable_chunked_prefill)

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self.check_admissible(request.num_prompt_tokens, request.sampling_params.max_tokens)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Remove a request from the queues and free its pages at once."""
        if request.is_finished:
            return
        if request in self.running:
            self.running.remove(request)
        else:
            try:
                self.waiting.remove(request)
            except ValueError:
                pass
        request.status = status
        self.kv.free(request)
        self.requests.pop(request.request_id, None)
        if request.first_scheduled_time is not None:   # an executor may hold its state
            self._finished_ids.append(request.request_id)
        if self.proposer is not None:
            self.proposer.finished(request.request_id)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # -------------------------------------------------------------- schedule
    def _preempt(self, victim: Request) -> None:
        self.running.remove(victim)
        self.kv.free(victim)
        victim.num_computed_tokens = 0
        victim.status = RequestStatus.PREEMPTED
        victim.num_preemptions += 1
        self.waiting.appendleft(victim)

    def schedule(self) -> StepPlan:
        """The next step's plan; its requests are in ``self.requests`` (running first, then
        the ones it admits, in admission order)."""
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        chunks: list[ScheduledRequest] = []
        preempted = False

        # 1. Running requests, oldest first.
        num_decodes, spare_rows = self._speculative_rows()
        decodes_left = num_decodes
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if num_new <= 0:
                i += 1
                continue
            drafts = []
            if num_new == 1 and spare_rows > 0:   # a fair share of the rows left for drafts
                drafts = self._drafts(req, min(budget, 1 + spare_rows // max(1, decodes_left)),
                                      num_decodes)
                spare_rows -= len(drafts)
                decodes_left -= 1
            if drafts and self.kv.allocate_slots(req, 1 + len(drafts)):
                chunks.append(self._chunk(req, 1, drafts=drafts))
                budget -= 1 + len(drafts)
                i += 1
                continue
            while not self.kv.allocate_slots(req, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                chunks.append(self._chunk(req, num_new))
                budget -= num_new
                i += 1
                continue
            break  # req itself was preempted; everything after it is gone too

        # 2. Waiting requests, fair across tenants (FIFO within one), unless this step had to
        #    preempt.
        while (self.waiting and budget > 0 and not preempted
               and len(self.running) < cfg.max_num_seqs):
            req = self.waiting.peek()
            # Prompt logprobs need every prompt position computed, so they bypass the cache.
            cached = ([] if req.sampling_params.prompt_logprobs is not None
                      else self.kv.find_cached_prefix(req))
            num_cached = len(cached) * self.kv.block_size
            num_new = req.num_tokens - num_cached
            if num_new > budget:
                if not cfg.enable_chunked_prefill:
                    break
                num_new = budget
            req.num_computed_tokens = num_cached
            if not self.kv.allocate_slots(req, num_new, cached):
                # Nothing running will free pages: TTL pins must give way or this waits forever.
                if (self.running or chunks or not self.kv.pool.release_pins()
                        or not self.kv.allocate_slots(req, num_new, cached)):
                    req.num_computed_tokens = 0
                    break
            self.waiting.popleft()
            self.kv.pool.record_lookup(req.num_tokens, num_cached)
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            chunks.append(self._chunk(req, num_new, admitted=True))
            budget -= num_new

        plan = StepPlan(chunks, self.kv.block_size)
        if chunks:   # delivered with the next plan that reaches the executor
            plan.finished_ids, self._finished_ids = self._finished_ids, []
        return plan

    def _speculative_rows(self) -> tuple[int, int]:
        """(decoding requests, rows left for their drafts) for the next step. No drafts when the
        step will not be decode-only (a running request still prefilling, or room to admit a
        waiting one): verification would leave the decode kernels (``max_speculative_rows``)."""
        if self.proposer is None:
            return 0, 0
        cap = self.config.max_speculative_rows
        lefts = [r.num_tokens - r.num_computed_tokens for r in self.running]
        num_decodes = lefts.count(1)
        if cap <= 0:       # no cap: drafts share any step, within the token budget
            return num_decodes, self.config.max_num_batched_tokens
        if any(n > 1 for n in lefts) or (self.waiting
                                         and len(self.running) < self.config.max_num_seqs):
            return num_decodes, 0
        return num_decodes, max(0, cap - num_decodes)

    def _drafts(self, req: Request, budget: int, num_decodes: int = 1) -> list[int]:
        """Draft tokens for a decoding request: at most K, within the budget, and no more than
        the request may still produce (accepted drafts plus the target's own token) within
        ``max_tokens`` and the context length; the proposer picks the length that pays in a
        step of ``num_decodes`` decoding requests. [] when it does not speculate."""
        if self.proposer is None:
            return []
        params = req.sampling_params
        if req.grammar is not None or params.logprobs is not None:
            return []   # verification handles neither a grammar mask nor per-token logprobs
        k = min(self.config.num_speculative_tokens, budget - 1,
                (params.max_tokens or 0) - len(req.output_token_ids) - 1,
                self.config.max_model_len - req.num_tokens - 1)
        if k <= 0:
            return []
        context = TokenView(req.prompt_token_ids, req.output_token_ids)
        draft = self.proposer.propose(req.request_id, context, k, batch=max(1, num_decodes))
        return [int(t) for t in draft[:k]]

    def trim_blocks(self, req: Request) -> None:
        """Give back the pages past the request's known tokens: after a speculative step they
        hold only K/V of rejected drafts (never hashed: only fully computed blocks are)."""
        keep = cdiv(req.num_tokens, self.kv.block_size)
        if len(req.block_ids) > keep:
            extra = req.block_ids[keep:]
            del req.block_ids[keep:]
            self.kv.pool.free_blocks(list(reversed(extra)))

    @staticmethod
    def _chunk(req: Request, num_new: int, admitted: bool = False,
               drafts: list[int] | None = None) -> ScheduledRequest:
        """A request's part of the plan: only this step's tokens, plus (on admission) what the
        executor keeps for the request's lifetime. The block table is the request's own list
        (not copied per step)."""
        start = req.num_computed_tokens
        end = start + num_new
        params = req.sampling_params
        return ScheduledRequest(
            req.request_id, req.token_slice(start, end), start, req.block_ids,
            sample=end == req.num_tokens, sampling_params=params,
            output_index=len(req.output_token_ids), draft_token_ids=drafts or [],
            new=(NewRequestData(req.prompt_token_ids, list(req.output_token_ids),
                                req.eos_token_ids) if admitted else None),
            compute_prompt_logprobs=(params.prompt_logprobs is not None
                                     and len(req.prompt_logprobs) == start + 1))
