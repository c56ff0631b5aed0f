"""The seam between scheduling and compute.

The scheduler produces a :class:`Batch`: for each scheduled request, a chunk of tokens whose
KV must be computed this step (a prefill chunk or one decode token). An executor computes them,
writes their K/V into the request's pages, and, when a chunk reaches the end of the request's
known tokens, samples the next token. Implementations: the PyTorch executor
(``tokenfactory.model.runner``), :class:`ScriptedExecutor` here (emits given token sequences, for
API tests), and a simulated one that only advances a clock (economics).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from tokenfactory.engine.request import PositionLogprobs, Request


@dataclass
class ScheduledChunk:
    request: Request
    start: int          # position of the first token to compute (== num_computed_tokens)
    num_tokens: int     # tokens to compute this step
    sample: bool        # True when the chunk ends at the last known token: sample a new one

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass
class Batch:
    chunks: list[ScheduledChunk]
    block_size: int

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


@dataclass
class SampleOutput:
    token_id: int | None                         # None when the chunk did not sample
    logprobs: PositionLogprobs | None = None     # chosen token + top-n, when asked
    prompt_logprobs: list[PositionLogprobs | None] = field(default_factory=list)


class Executor(Protocol):
    """What the engine needs from a compute backend."""

    def kv_cache_bytes_per_block(self, block_size: int) -> int: ...

    def initialize_cache(self, num_blocks: int, block_size: int) -> None: ...

    def execute(self, batch: Batch) -> list[SampleOutput]: ...


class ScriptedExecutor:
    """Emits a scripted token sequence per request instead of running a model.

    ``script`` maps a request to the token ids it should produce (e.g. the tokenization of a
    tool call), so tool parsing, stop sequences and streaming can be tested end to end with
    real scheduling and real KV page accounting but no trained model. When a script runs out,
    ``fallback_token`` is emitted (typically EOS).
    """

    def __init__(self, script: Callable[[Request], Sequence[int]], fallback_token: int,
                 bytes_per_block: int = 4096):
        self.script = script
        self.fallback_token = fallback_token
        self.bytes_per_block = bytes_per_block
        # request_id -> (request, its scripted tokens); pruned once the request has finished.
        self._scripts: dict[str, tuple[Request, list[int]]] = {}
        self.num_steps = 0

    def kv_cache_bytes_per_block(self, block_size: int) -> int:
        return self.bytes_per_block

    def initialize_cache(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks

    def execute(self, batch: Batch) -> list[SampleOutput]:
        self.num_steps += 1
        for rid in [r for r, (req, _) in self._scripts.items() if req.is_finished]:
            del self._scripts[rid]
        outs = []
        for chunk in batch.chunks:
            req = chunk.request
            if not chunk.sample:
                outs.append(SampleOutput(None))
                continue
            entry = self._scripts.get(req.request_id)
            if entry is None or entry[0] is not req:
                entry = self._scripts[req.request_id] = (req, list(self.script(req)))
            tokens = entry[1]
            i = len(req.output_token_ids)
            outs.append(SampleOutput(tokens[i] if i < len(tokens) else self.fallback_token))
        return outs
