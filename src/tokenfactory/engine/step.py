"""The step plan and step result: plain data between the engine and an executor.

One engine step is: the scheduler emits a :class:`StepPlan` (per scheduled request: the tokens
whose KV to compute, their positions, the block table, whether to sample, proposed draft tokens,
sampling settings, a grammar-mask row), an executor runs it and returns a :class:`StepResult`
(per request: the accepted token ids with their logprobs, or an error), and the engine folds the
result back into its requests. Nothing here refers to the engine's live ``Request`` objects: a
plan pickles cheaply and can cross a process boundary (a worker process, a remote replica).

What an executor needs across steps it keeps itself, keyed by request id
(:class:`SequenceStates`): the prompt ids and the outputs so far (for penalties and prompt
logprobs), the sampler's per-request caches. The engine sends the prompt and outputs once, when
the request is (re)admitted (:attr:`ScheduledRequest.new`); every later step carries only the new
tokens. :attr:`StepPlan.finished_ids` tells the executor which states to drop.

In-process, the lists in a plan may be the engine's own (the block table is not copied each
step): an executor must treat a plan as read-only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenfactory.engine.request import PositionLogprobs
from tokenfactory.engine.sampling_params import SamplingParams

__all__ = ["NewRequestData", "ScheduledRequest", "StepPlan", "RequestStepOutput", "StepResult",
           "SequenceState", "SequenceStates"]


@dataclass
class NewRequestData:
    """Sent once per admission (and again after a preemption): what the executor keeps."""
    prompt_token_ids: list[int]
    output_token_ids: list[int]            # outputs produced before this admission
    eos_token_ids: frozenset[int] = frozenset()


@dataclass
class ScheduledRequest:
    request_id: str
    token_ids: list[int]        # known tokens whose KV is computed this step
    start: int                  # position of token_ids[0] (== the request's computed tokens)
    block_ids: list[int]        # block table; covers at least positions [0, end)
    sample: bool                # the chunk reaches the last known token: sample what follows
    sampling_params: SamplingParams
    output_index: int           # outputs produced so far (the seed position of the next one)
    # Proposed tokens (speculation) following token_ids: their KV is computed too, and the
    # executor returns how many it accepts. [] without speculation.
    draft_token_ids: list[int] = field(default_factory=list)
    new: NewRequestData | None = None      # set on the first step after (re)admission
    compute_prompt_logprobs: bool = False  # return logprobs of prompt tokens start+1 .. end
    grammar_row: int | None = None         # row of StepPlan.grammar_bitmask for this request

    @property
    def num_tokens(self) -> int:
        """Positions whose KV this step computes (known tokens plus drafts)."""
        return len(self.token_ids) + len(self.draft_token_ids)

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass
class StepPlan:
    requests: list[ScheduledRequest]
    block_size: int
    finished_ids: list[str] = field(default_factory=list)   # drop their executor-side state
    # (G, ceil(V/32)) int32 allowed-token bitmask (text/grammar.py layout), one row per
    # sampling request with a structured-output grammar; None when there is none.
    grammar_bitmask: Any = None

    @property
    def num_tokens(self) -> int:
        return sum(r.num_tokens for r in self.requests)


@dataclass
class RequestStepOutput:
    request_id: str
    # Accepted new tokens: one for a sampling chunk today, 1..K+1 under speculation, [] when
    # the chunk did not sample (or failed).
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] = field(default_factory=list)   # per token, when asked
    prompt_logprobs: list[PositionLogprobs | None] = field(default_factory=list)
    error: str | None = None    # this request's row failed (e.g. non-finite logits)


@dataclass
class StepResult:
    outputs: list[RequestStepOutput]   # one per scheduled request, in plan order


# ------------------------------------------------------------------ executor-side state
@dataclass
class SequenceState:
    """What an executor knows of one request between steps (the sampler's view of it)."""
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: frozenset[int]
    sampling_params: SamplingParams
    stop_token_set: frozenset[int] = frozenset()
    sampler_cache: dict[str, Any] = field(default_factory=dict, repr=False)
    sampling_error: str | None = None   # set by the sampler when this row failed

    def observe(self, sched: ScheduledRequest) -> None:
        """Record the tokens of this step beyond what is known (the outputs sampled since)."""
        known = len(self.prompt_token_ids) + len(self.output_token_ids)
        end = sched.start + len(sched.token_ids)
        if end > known:
            if sched.start > known:
                raise ValueError(f"request {sched.request_id}: step starts at {sched.start} but "
                                 f"the executor knows only {known} tokens")
            self.output_token_ids.extend(sched.token_ids[known - sched.start:])
        if len(self.output_token_ids) > sched.output_index and sched.sample:
            # the engine kept fewer outputs than this executor saw (it never does today)
            del self.output_token_ids[sched.output_index:]


class SequenceStates:
    """Executor-side states by request id, kept in step with the plans."""

    def __init__(self) -> None:
        self._states: dict[str, SequenceState] = {}

    def __len__(self) -> int:
        return len(self._states)

    def get(self, request_id: str) -> SequenceState | None:
        return self._states.get(request_id)

    def update(self, plan: StepPlan) -> list[SequenceState]:
        """Drop finished requests, register new ones, record new tokens; returns the states of
        ``plan.requests`` in order. Idempotent for a plan retried."""
        for rid in plan.finished_ids:
            self._states.pop(rid, None)
        states = []
        for sched in plan.requests:
            state = self._states.get(sched.request_id)
            if sched.new is not None:
                new = sched.new
                if (state is None or state.prompt_token_ids is not new.prompt_token_ids
                        or len(state.output_token_ids) != len(new.output_token_ids)):
                    params = sched.sampling_params
                    state = self._states[sched.request_id] = SequenceState(
                        sched.request_id, new.prompt_token_ids, list(new.output_token_ids),
                        new.eos_token_ids, params,
                        frozenset(params.stop_token_ids or ()))
            elif state is None:
                raise ValueError(f"request {sched.request_id} was never sent to this executor")
            state.observe(sched)
            states.append(state)
        return states
