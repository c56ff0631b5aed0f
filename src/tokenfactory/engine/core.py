"""EngineCore: the synchronous factory floor. ``add_request`` / ``abort`` / ``step``.

One ``step()`` = schedule a batch under the token budget, run it on the executor, fold the
sampled tokens back into the requests, detokenize, check stop conditions, free finished pages.
It is single-threaded and deterministic; the async wrapper drives it from its own thread.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from tokenfactory.engine.executor import Executor, ExecutorDeadError
from tokenfactory.engine.kv_manager import KVCacheManager
from tokenfactory.engine.request import (CacheBreakpoint, CompletionOutput, Request, RequestMetrics,
                                         RequestOutput, RequestStatus)
from tokenfactory.engine.sampling_params import SamplingParams
from tokenfactory.engine.scheduler import AdmissionError, Scheduler, SchedulerConfig
from tokenfactory.engine.step import RequestStepOutput, ScheduledRequest, StepPlan, StepResult

log = logging.getLogger(__name__)

__all__ = ["EngineConfig", "EngineCore", "AdmissionError", "StepHook", "StepListener"]

# Called after every forward pass: (seconds the step took, {request_id: tokens it processed}).
StepListener = Callable[[float, dict[str, int]], None]
StepHook = StepListener   # the older name


@dataclass
class EngineConfig:
    max_model_len: int | None = None         # None: the model's own limit
    block_size: int = 16
    kv_cache_memory: int | None = None       # bytes for KV pages; None: kv_cache_fraction of free RAM
    kv_cache_fraction: float = 0.25
    num_kv_blocks: int | None = None         # overrides both (tests)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_pinned_fraction: float = 0.5         # at most this share of pages may be TTL-pinned
    speculative: str | None = None           # proposer: "ngram" | "suffix" | "draft:PATH" | None
    num_speculative_tokens: int = 4          # K: drafts per decoding request and step

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.num_speculative_tokens < 0:
            raise ValueError("num_speculative_tokens must be >= 0, "
                             f"got {self.num_speculative_tokens}")


@dataclass
class SpecStats:
    """Speculation counters of one proposer (``EngineCore.spec_stats``)."""
    num_drafts: int = 0              # request-steps that carried drafts
    num_draft_tokens: int = 0        # tokens proposed
    num_accepted_tokens: int = 0     # proposed tokens the target kept

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per speculative request-step: accepted drafts plus the target's own one."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


class EngineCore:
    def __init__(self, executor: Executor, config: EngineConfig, *, model_max_len: int,
                 tokenizer=None, eos_token_ids: Sequence[int] = (),
                 clock: Callable[[], float] = time.monotonic, step_hook: StepHook | None = None,
                 kv_connector=None, proposer=None):
        """``proposer``: a draft proposer object (``model.proposers.Proposer``) overriding
        ``config.speculative`` (tests; a proposer shared between engines)."""
        self.executor = executor
        self.config = config
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.clock = clock
        # Observers of every step (cost ledger, dashboard, trace): each is called in order with
        # the step's seconds and tokens per request. ``step_hook=`` is the first of them.
        self._step_listeners: list[StepListener] = [step_hook] if step_hook is not None else []
        self.max_model_len = min(config.max_model_len or model_max_len, model_max_len)
        # Prompt ids are checked against it (when the executor knows it): an out-of-range id
        # would fail the forward pass of every request batched with it.
        self.vocab_size: int | None = getattr(getattr(executor, "model_config", None),
                                              "vocab_size", None)

        bytes_per_block = executor.kv_cache_bytes_per_block(config.block_size)
        if config.num_kv_blocks is not None:
            num_blocks = config.num_kv_blocks
        else:
            budget = config.kv_cache_memory
            if budget is None:
                budget = int(available_memory_bytes() * config.kv_cache_fraction)
            num_blocks = budget // bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"KV cache budget too small: one page of {config.block_size} tokens "
                             f"needs {bytes_per_block} bytes")
        self.kv_cache_bytes = num_blocks * bytes_per_block
        executor.initialize_cache(num_blocks, config.block_size)
        # a connector (disk tier, remote KV) is consulted by the KV manager on a prefix miss
        connector_arg = {} if kv_connector is None else {"connector": kv_connector}
        self.kv = KVCacheManager(num_blocks, config.block_size,
                                 enable_prefix_caching=config.enable_prefix_caching,
                                 clock=clock, max_pinned_fraction=config.max_pinned_fraction,
                                 **connector_arg)
        if proposer is None and config.speculative:
            from tokenfactory.model.proposers import make_proposer
            # a draft model must share the target's vocabulary and runs in its dtype
            proposer = make_proposer(config.speculative, vocab_size=self.vocab_size,
                                     dtype=getattr(executor, "dtype", None),
                                     device=getattr(executor, "device", "cpu"))
        self.proposer = proposer
        # a draft model weighs its own forward time against the target's step time
        on_target_step = getattr(proposer, "on_target_step", None)
        if on_target_step is not None:
            self._step_listeners.append(on_target_step)
        # per proposer name: drafts proposed and accepted (/metrics, response headers, bench)
        self.spec_stats: dict[str, SpecStats] = {}
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enable_chunked_prefill=config.enable_chunked_prefill,
            num_speculative_tokens=config.num_speculative_tokens if proposer else 0),
            self.kv, proposer)
        # Requests finished outside step() (aborts) whose final output is still owed.
        self._pending_outputs: list[RequestOutput] = []
        self.num_steps = 0
        log.info("KV cache: %d pages x %d tokens (%.1f MiB)", num_blocks, config.block_size,
                 self.kv_cache_bytes / 2**20)

    def add_step_listener(self, fn: StepListener) -> None:
        """Call ``fn(seconds, {request_id: tokens processed})`` after every forward pass
        (failed chunks are not reported)."""
        self._step_listeners.append(fn)

    def remove_step_listener(self, fn: StepListener) -> None:
        self._step_listeners.remove(fn)

    # ------------------------------------------------------------------ intake
    def check_admissible(self, num_prompt_tokens: int, max_tokens: int | None) -> None:
        self.scheduler.check_admissible(num_prompt_tokens, max_tokens)

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int],
                    sampling_params: SamplingParams | None = None, *, prompt: str | None = None,
                    cache_salt: str | None = None,
                    cache_breakpoints: Sequence[CacheBreakpoint] = (),
                    arrival_time: float | None = None, tenant: str | None = None) -> Request:
        """Queue a request. ``tenant`` (e.g. the API key's name; None = the shared tenant)
        only affects admission order: waiting requests are admitted round robin by tenant,
        FIFO within one (see ``Scheduler``). Raises ValueError (AdmissionError) for a request
        that can never be served; nothing is queued then."""
        params = sampling_params or SamplingParams()
        ids = list(prompt_token_ids)
        if ids and self.vocab_size is not None and not (
                0 <= min(ids) and max(ids) < self.vocab_size):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if params.max_tokens is None:
            params.max_tokens = max(1, self.max_model_len - len(ids))
        req = Request(request_id, ids, params, eos_token_ids=self.eos_token_ids,
                      arrival_time=self.clock() if arrival_time is None else arrival_time,
                      cache_salt=cache_salt, cache_breakpoints=tuple(cache_breakpoints),
                      prompt=prompt, tenant=tenant)
        if params.structured_output is not None:
            # compiled (or fetched from the cache) now, so a bad schema is refused before it
            # is queued, and never in the middle of a batch
            if self.tokenizer is None:
                raise ValueError("structured outputs need a tokenizer")
            from tokenfactory.text.grammar import compile_structured_output
            req.grammar = compile_structured_output(self.tokenizer,
                                                    params.structured_output).matcher()
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]  # the first token has no logprob
        if self.tokenizer is not None:
            from tokenfactory.text.detokenizer import IncrementalDetokenizer
            req.detokenizer = IncrementalDetokenizer(
                self.tokenizer, skip_special_tokens=params.skip_special_tokens,
                stop=list(params.stop), include_stop_str_in_output=params.include_stop_str_in_output,
                prompt_token_ids=ids)
        elif params.stop:
            raise ValueError("stop strings need a tokenizer")
        self.scheduler.add(req)
        return req

    def abort(self, request_id: str) -> bool:
        req = self.scheduler.requests.get(request_id)
        if req is None:
            return False
        req.finish_reason = "abort"
        self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
        req.finished_time = self.clock()
        self._pending_outputs.append(self._make_output(req, [], ""))
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0 or bool(self._pending_outputs)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def num_waiting_for(self, tenant: str | None) -> int:
        """Requests of ``tenant`` waiting for admission (preempted ones included)."""
        return self.scheduler.waiting.count(tenant)

    def waiting_by_tenant(self) -> dict[str | None, int]:
        """{tenant: waiting requests}, tenants with none omitted (a snapshot)."""
        return self.scheduler.waiting.counts()

    # -------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """schedule -> plan -> execute -> result -> update (docs/engine.md)."""
        outputs, self._pending_outputs = self._pending_outputs, []
        plan = self.scheduler.schedule()
        if not plan.requests:
            return outputs
        self.num_steps += 1
        t0 = self.clock()
        reqs = [self.scheduler.requests[s.request_id] for s in plan.requests]
        for req in reqs:
            if req.first_scheduled_time is None:
                req.first_scheduled_time = t0
        grammar_errors = self._fill_grammar_masks(plan, reqs)
        results = self._execute(plan, reqs, outputs)
        now = self.clock()
        done = {s.request_id: s.num_tokens for s, r in zip(plan.requests, results)
                if r is not None}
        if done:   # failed chunks are not charged
            for listener in self._step_listeners:
                listener(now - t0, done)

        for sched, req, res in zip(plan.requests, reqs, results):
            if req.is_finished or res is None:  # aborted while the step ran, or failed
                continue
            if res.error is not None:
                # this request's row could not be sampled: it fails, its batch-mates go on
                error = res.error
                if req.request_id in grammar_errors:
                    error = f"structured output: {grammar_errors[req.request_id]}"
                log.warning("request %s failed in sampling: %s", req.request_id, error)
                self._fail(req, f"sampling failed: {error}", outputs)
                continue
            self._update(req, sched, res, now, outputs)
        return outputs

    def _update(self, req: Request, sched: ScheduledRequest, res: RequestStepOutput, now: float,
                outputs: list[RequestOutput]) -> None:
        """Fold one request's step result back: computed tokens, prompt logprobs, prefix
        cache, then each accepted token in order (grammar, stop conditions)."""
        was_prefilling = req.num_computed_tokens < req.num_prompt_tokens
        num_computed = len(sched.token_ids)
        if sched.draft_token_ids:
            # K/V is kept for the accepted drafts: every returned token but the last was a
            # draft the target agreed with (the last is its own, computed next step)
            num_computed += max(0, len(res.token_ids) - 1)
            self._count_drafts(req, sched.draft_token_ids, res.token_ids)
        req.num_computed_tokens += num_computed
        req.num_processed_tokens += sched.num_tokens
        if res.prompt_logprobs and sched.compute_prompt_logprobs:
            # Entries for prompt tokens start+1 .. (skipped when a preempted request recomputes).
            req.prompt_logprobs.extend(res.prompt_logprobs)
        self.kv.cache_computed_blocks(req)
        if was_prefilling and req.num_computed_tokens >= req.num_prompt_tokens:
            self.kv.pin_breakpoints(req)
        if not sched.sample or not res.token_ids:
            return
        new_ids: list[int] = []
        new_text = ""
        for k, token in enumerate(res.token_ids):
            if req.grammar is not None and not req.grammar.accept(token):
                # the mask allowed only what the grammar accepts, so only a fault gets here
                self._fail(req, f"structured output: the grammar rejected token {token}"
                           f" ({req.grammar.error or 'not allowed'})", outputs)
                return
            req.output_token_ids.append(token)
            new_ids.append(token)
            if k < len(res.logprobs):
                req.logprobs.append(res.logprobs[k])
            if req.first_token_time is None:
                req.first_token_time = now
            new_text += self._check_stop(req, token)
            if req.finish_reason is not None:
                status = (RequestStatus.FINISHED_LENGTH if req.finish_reason == "length"
                          else RequestStatus.FINISHED_STOPPED)
                self.scheduler.finish(req, status)
                req.finished_time = now
                break
        if sched.draft_token_ids and not req.is_finished:
            self.scheduler.trim_blocks(req)   # pages holding only rejected drafts' K/V
        outputs.append(self._make_output(req, new_ids, new_text))

    def _count_drafts(self, req: Request, drafts: list[int], tokens: list[int]) -> None:
        """Count one verified draft, and tell the proposer how much of it was kept."""
        accepted = 0   # leading tokens equal to the drafts (a correction always differs)
        while accepted < min(len(drafts), len(tokens)) and tokens[accepted] == drafts[accepted]:
            accepted += 1
        name = getattr(self.proposer, "name", None) or type(self.proposer).__name__
        stats = self.spec_stats.get(name)
        if stats is None:
            stats = self.spec_stats[name] = SpecStats()
        stats.num_drafts += 1
        stats.num_draft_tokens += len(drafts)
        stats.num_accepted_tokens += accepted
        req.num_spec_proposed_tokens += len(drafts)
        req.num_spec_accepted_tokens += accepted
        if self.proposer is not None:
            self.proposer.observe(req.request_id, accepted, len(drafts))

    def _fill_grammar_masks(self, plan: StepPlan, reqs: list[Request]) -> dict[str, str]:
        """Put the allowed-token bitmask of every sampling request with a grammar into the
        plan (one row each). Returns {request_id: error} for matchers that failed (their row
        allows nothing, so the executor reports the row as unsampleable)."""
        rows = [k for k, (s, r) in enumerate(zip(plan.requests, reqs))
                if s.sample and r.grammar is not None]
        if not rows:
            return {}
        from tokenfactory.text.grammar import allocate_bitmask, fill_bitmasks
        matchers = [reqs[k].grammar for k in rows]
        bitmask = allocate_bitmask(len(rows), max(m.vocab_size for m in matchers))  # (G, W)
        errors = fill_bitmasks(matchers, bitmask)
        for g, k in enumerate(rows):
            plan.requests[k].grammar_row = g
        plan.grammar_bitmask = bitmask
        return {reqs[rows[g]].request_id: msg for g, msg in errors.items()}

    def _execute(self, plan: StepPlan, reqs: list[Request],
                 outputs: list[RequestOutput]) -> list[RequestStepOutput | None]:
        """Run the plan. When the forward pass raises, each request is retried alone, so a
        fault that one request causes fails that request only (finish reason ``error``, pages
        freed) and its batch-mates get the results they would have had alone; a failed
        request's result is None. Retrying rewrites the same K/V slots with the same values and
        nothing else has changed yet: the engine's state is only updated after this returns."""
        try:
            return self._checked(plan, self.executor.execute(plan))
        except ExecutorDeadError:
            raise
        except Exception as exc:  # noqa: BLE001 - isolated below
            if len(plan.requests) == 1:
                log.exception("forward pass failed; failing request %s", reqs[0].request_id)
                self._fail(reqs[0], f"{type(exc).__name__}: {exc}", outputs)
                return [None]
            log.exception("forward pass of %d requests failed; retrying each alone",
                          len(plan.requests))
        results: list[RequestStepOutput | None] = []
        for sched, req in zip(plan.requests, reqs):
            alone = StepPlan([sched], plan.block_size, plan.finished_ids, plan.grammar_bitmask)
            try:
                results.append(self._checked(alone, self.executor.execute(alone))[0])
            except ExecutorDeadError:
                raise
            except Exception as exc:  # noqa: BLE001 - fails this request only
                # one line each (the traceback was logged above): a fault hitting every
                # request must not multiply the log by the batch size
                log.warning("forward pass failed alone too; failing request %s (%s: %s)",
                            req.request_id, type(exc).__name__, exc)
                self._fail(req, f"{type(exc).__name__}: {exc}", outputs)
                results.append(None)
        return results

    @staticmethod
    def _checked(plan: StepPlan, result: StepResult) -> list[RequestStepOutput | None]:
        outs = result.outputs
        if len(outs) != len(plan.requests) or any(
                o.request_id != s.request_id for o, s in zip(outs, plan.requests)):
            raise RuntimeError("the executor's result does not match its plan "
                               f"({len(outs)} outputs for {len(plan.requests)} requests)")
        return list(outs)

    def _fail(self, req: Request, error: str, outputs: list[RequestOutput]) -> None:
        req.finish_reason, req.error = "error", error
        self.scheduler.finish(req, RequestStatus.FINISHED_ERROR)
        req.finished_time = self.clock()
        outputs.append(self._make_output(req, [], ""))

    def _check_stop(self, req: Request, token: int) -> str:
        """Detokenize the new token and decide whether the request is done. Returns new text."""
        params = req.sampling_params
        n_out = len(req.output_token_ids)
        new_text = ""
        stop_string = None
        if req.detokenizer is not None:
            upd = req.detokenizer.update([token])
            new_text, stop_string = upd.text_delta, upd.stop_string
        if stop_string is not None:
            req.finish_reason, req.stop_reason = "stop", stop_string
        elif n_out >= params.min_tokens and token in req.stop_token_set:
            req.finish_reason, req.stop_reason = "stop", token
        elif n_out >= params.min_tokens and not params.ignore_eos and token in req.eos_token_ids:
            req.finish_reason = "stop"
        elif req.grammar is not None and req.grammar.is_terminated():
            req.finish_reason = "stop"     # the structured output is complete
        elif n_out >= (params.max_tokens or 0) or req.num_tokens >= self.max_model_len:
            req.finish_reason = "length"
        if req.finish_reason is not None and stop_string is None and req.detokenizer is not None:
            new_text += req.detokenizer.flush()
        req.output_text += new_text
        return new_text

    def _make_output(self, req: Request, new_ids: list[int], new_text: str) -> RequestOutput:
        params = req.sampling_params
        comp = CompletionOutput(
            index=0, text=req.output_text, token_ids=list(req.output_token_ids),
            finish_reason=req.finish_reason, stop_reason=req.stop_reason,
            logprobs=list(req.logprobs) if params.logprobs is not None else None,
            new_text=new_text, new_token_ids=new_ids)
        return RequestOutput(
            request_id=req.request_id, prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids, num_cached_tokens=max(req.num_cached_tokens, 0),
            outputs=[comp], finished=req.is_finished,
            prompt_logprobs=list(req.prompt_logprobs) if params.prompt_logprobs is not None else None,
            metrics=RequestMetrics(req.arrival_time, req.first_scheduled_time, req.first_token_time,
                                   req.finished_time, req.num_preemptions,
                                   req.num_spec_proposed_tokens, req.num_spec_accepted_tokens),
            error=req.error)

    # ------------------------------------------------------------------- stats
    def num_free_blocks(self) -> int:
        return self.kv.num_free_blocks()

    def reset_prefix_cache(self) -> None:
        self.kv.pool.reset_prefix_cache()
