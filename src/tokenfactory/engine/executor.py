"""The seam between scheduling and compute.

The scheduler produces a :class:`~tokenfactory.engine.step.StepPlan`: for each scheduled
request, the tokens whose KV must be computed this step (a prefill chunk, one decode token, or a
token plus proposed drafts). An executor computes them, writes their K/V into the request's
pages, and, when a chunk reaches the end of the request's known tokens, samples what follows; it
returns a :class:`~tokenfactory.engine.step.StepResult`. Implementations: the PyTorch executor
(``tokenfactory.model.runner``), :class:`ScriptedExecutor` here (emits given token sequences, for
API tests), a simulated one that only advances a clock (``economics/simulated.py``), and the
fault-injecting wrapper in ``engine/faults.py``.

:class:`Batch` / :class:`ScheduledChunk` describe a forward pass in terms of live requests: a
convenience for tests and debugging (``TorchExecutor.forward_logits``), turned into a plan by
:meth:`Batch.to_plan`. The engine itself only hands executors plans.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from tokenfactory.engine.request import Request
from tokenfactory.engine.step import (NewRequestData, RequestStepOutput, ScheduledRequest,
                                      SequenceState, SequenceStates, StepPlan, StepResult)


@dataclass
class ScheduledChunk:
    request: Request
    start: int          # position of the first token to compute
    num_tokens: int     # tokens to compute
    sample: bool        # True when the chunk ends at the last known token

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass
class Batch:
    chunks: list[ScheduledChunk]
    block_size: int

    def to_plan(self) -> StepPlan:
        """The plan for these chunks, each request sent in full (as if newly admitted)."""
        return StepPlan([ScheduledRequest(
            c.request.request_id, c.request.token_slice(c.start, c.end), c.start,
            c.request.block_ids, c.sample, c.request.sampling_params,
            len(c.request.output_token_ids),
            new=NewRequestData(c.request.prompt_token_ids, list(c.request.output_token_ids),
                               c.request.eos_token_ids)) for c in self.chunks],
            self.block_size)


class ExecutorDeadError(RuntimeError):
    """The executor can run nothing any more (its device, worker or process is gone). Unlike
    any other exception from ``execute``, which the engine pins on the requests that cause it,
    this one escapes ``EngineCore.step``: the engine is dead."""


class Executor(Protocol):
    """What the engine needs from a compute backend."""

    def kv_cache_bytes_per_block(self, block_size: int) -> int: ...

    def initialize_cache(self, num_blocks: int, block_size: int) -> None: ...

    def execute(self, plan: StepPlan) -> StepResult: ...


class ScriptedExecutor:
    """Emits a scripted token sequence per request instead of running a model.

    ``script`` maps a request's executor-side view (a :class:`SequenceState`: ``request_id``,
    ``prompt_token_ids``, ``output_token_ids``, ``sampling_params``) to the token ids it should
    produce (e.g. the tokenization of a tool call), so tool parsing, stop sequences and streaming
    can be tested end to end with real scheduling and real KV page accounting but no trained
    model. It is called once per request. When a script runs out, ``fallback_token`` is emitted
    (typically EOS). Picklable when its script is.
    """

    def __init__(self, script: Callable[[SequenceState], Sequence[int]], fallback_token: int,
                 bytes_per_block: int = 4096):
        self.script = script
        self.fallback_token = fallback_token
        self.bytes_per_block = bytes_per_block
        self.states = SequenceStates()
        self._scripts: dict[str, list[int]] = {}   # request id -> its tokens
        self.num_steps = 0

    def kv_cache_bytes_per_block(self, block_size: int) -> int:
        return self.bytes_per_block

    def initialize_cache(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks

    def view(self, sched: ScheduledRequest) -> SequenceState:
        """The executor-side view of a scheduled request (registered on first sight), for
        subclasses that decide per request before :meth:`execute` runs."""
        return self.states.update(StepPlan([sched], 0))[0]

    def _token(self, tokens: list[int], i: int) -> int:
        return tokens[i] if i < len(tokens) else self.fallback_token

    def execute(self, plan: StepPlan) -> StepResult:
        self.num_steps += 1
        for rid in plan.finished_ids:
            self._scripts.pop(rid, None)
        outs = []
        for sched, state in zip(plan.requests, self.states.update(plan)):
            if not sched.sample:
                outs.append(RequestStepOutput(sched.request_id))
                continue
            if sched.request_id not in self._scripts or (
                    sched.new is not None and sched.output_index == 0):   # a new request
                self._scripts[sched.request_id] = list(self.script(state))
            tokens = self._scripts[sched.request_id]
            i = sched.output_index
            out = [self._token(tokens, i)]
            for draft in sched.draft_token_ids:   # drafts are kept while they match the script
                if out[-1] != draft:
                    break
                out.append(self._token(tokens, i + len(out)))
            state.output_token_ids.extend(out[:-1])
            outs.append(RequestStepOutput(sched.request_id, out))
        return StepResult(outs)
