"""The engine's view of a request, and what it hands back (vLLM-shaped outputs)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from tokenfactory.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"
    FINISHED_ERROR = "finished_error"

    @property
    def finished(self) -> bool:
        return self.value.startswith("finished")


@dataclass(frozen=True)
class CacheBreakpoint:
    """Retain the KV pages covering the first ``num_tokens`` prompt tokens for ``ttl_seconds``.

    The HTTP layer derives these from Anthropic ``cache_control`` markers; the block pool pins
    the pages against eviction and refreshes the pin on every hit.
    """

    num_tokens: int
    ttl_seconds: float


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One entry per position: {token_id: Logprob} holding the chosen token plus the top-n.
PositionLogprobs = dict[int, Logprob]


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = 0.0
    cache_salt: str | None = None
    cache_breakpoints: tuple[CacheBreakpoint, ...] = ()
    prompt: str | None = None
    # Who sent it (an API key's tenant); None is the one shared tenant. Admission is fair
    # across tenants (see Scheduler).
    tenant: str | None = None

    # ---- mutable state, owned by the scheduler ----
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Prompt tokens whose KV was reused from the prefix cache at first admission (-1 = not yet).
    num_cached_tokens: int = -1
    block_ids: list[int] = field(default_factory=list)
    # Chained content hashes of this request's full blocks, in order (grows as tokens are added).
    block_hashes: list[bytes] = field(default_factory=list)
    num_preemptions: int = 0
    # speculative decoding: draft tokens proposed for this request, and those the target kept
    num_spec_proposed_tokens: int = 0
    num_spec_accepted_tokens: int = 0
    finish_reason: str | None = None      # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # matched stop string or stop token id
    error: str | None = None
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] = field(default_factory=list)
    # Filled by the engine's output processor.
    detokenizer: Any = None
    output_text: str = ""
    # Timing (engine clock).
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    # Tokens processed in forward passes for this request (prefill + decode), for the ledger.
    num_processed_tokens: int = 0
    # Computed once per request, never per step: stop ids as a set for the stop check.
    stop_token_set: frozenset[int] = field(init=False, repr=False, compare=False)
    # Only when a Request itself is handed to the sampler (tests; the engine never does: its
    # executors keep this state in ``engine.step.SequenceState``): the sampler's per-request
    # cache, and why this row could not be sampled.
    sampler_cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    sampling_error: str | None = None
    # Structured output: this request's grammar matcher (``text.grammar.GrammarMatcher``), or
    # None. The engine fills this request's row of the step plan's bitmask from it, advances it
    # with each token and finishes the request when it terminates.
    grammar: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.stop_token_set = frozenset(self.sampling_params.stop_token_ids or ())

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, i: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]

    def token_slice(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]

    @property
    def is_finished(self) -> bool:
        return self.status.finished


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[PositionLogprobs] | None = None
    # What this update added (for streaming consumers).
    new_text: str = ""
    new_token_ids: list[int] = field(default_factory=list)


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finished_time: float | None
    num_preemptions: int = 0
    num_spec_proposed_tokens: int = 0     # draft tokens proposed (speculative decoding)
    num_spec_accepted_tokens: int = 0     # of them, kept by the target


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    num_cached_tokens: int
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    metrics: RequestMetrics | None = None
    error: str | None = None

    @property
    def usage(self) -> dict[str, int]:
        out = self.outputs[0]
        return {
            "prompt_tokens": len(self.prompt_token_ids),
            "cached_tokens": max(self.num_cached_tokens, 0),
            "output_tokens": len(out.token_ids),
        }
