"""Draft-model proposals: a small model that shares the target's vocabulary guesses the next
k tokens greedily, and the target checks them in one pass (``model/spec_verify.py``).

The draft runs on the engine's own executor (``TorchExecutor``: the same kernels, the native
decode step where the model offers one, GGUF blocks executed as stored) over a paged KV cache
of its own, sized by ``draft_kv_tokens`` and allocated here from a plain free list. Per
request the cache holds the K/V of the tokens it has seen, so a ``propose()`` feeds only what
was added since the last call (the target's accepted drafts and its own token, one row each
of one native decode step) and then decodes ``k - 1`` more tokens: k drafts cost k forwards.
``observe()`` cuts the cache back to what the target kept, so the K/V of rejected drafts never
stays; ``propose()`` also checks its cached drafts against the context it is given (a draft
that did not ride in the step is simply compared with the token that came instead).
``finished()`` frees the request's pages. When the pool is full the least recently used
request's pages are taken: it re-prefills on its next call, nobody sees an error. A request
too long for the whole pool gets no drafts.

Cost: unlike a lookup, a draft model's proposal is not free. ``DraftAcceptance`` adds the
draft's own forward cost per drafted token (``draft_cost``, in units of one target 1-row
decode step) to the row cost of the shared cost model (``proposers/base.py``), so a draft about
as slow as the target needs near-certain acceptance to be worth proposing, and one whose drafted
token costs a whole target step or more is never run (not even to probe). The cost is
measured: the proposer times its own forwards, and the target's steps reach it through
``on_target_step`` (an engine step listener, ``EngineCore.add_step_listener``); until both are
known it uses ``DRAFT_COST_PRIOR``, or a fixed ``draft_cost`` when one is given. A draft also
prefills every prompt it drafts for (on its first proposal): a cost the per-token model does
not see, paid once per request.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from tokenfactory.engine.sampling_params import SamplingParams
from tokenfactory.engine.step import NewRequestData, ScheduledRequest, StepPlan
from tokenfactory.model.proposers.base import Acceptance

log = logging.getLogger(__name__)

DRAFT_COST_PRIOR = 0.5        # draft seconds per drafted token / target 1-row step, unmeasured
_EXECUTOR_ID = "draft"        # the draft executor's one sequence state (rebuilt every forward)
_EMA = 0.9                    # weight kept by the old average per new timing
_MAX_TIMED_ROWS = 8           # target steps above this many rows do not fit the row-cost model
_MAX_TIMED_TAIL = 16          # draft calls feeding more new tokens than this are not timed
_MAX_ROW_RUN = 8              # new tokens fed one row each (the native decode step's row limit)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class DraftAcceptance(Acceptance):
    """The shared cost model plus the draft's own forward per drafted token: a drafted token
    costs ``row_cost`` (its row in the target's step) + ``draft_cost`` (its draft forward),
    both in 1-row target steps. The draft's cost is not shared with other requests' rows, so
    at batch b, against one request's share of the step, it is
    ``b * (row_cost + draft_cost) / (1 + (b - 1) * row_cost)``."""

    draft_cost: float = DRAFT_COST_PRIOR

    def row_cost_in(self, batch: int) -> float:
        b = max(1, batch)
        return b * (self.row_cost + self.draft_cost) / (1.0 + (b - 1) * self.row_cost)

    def limit(self, k: int, batch: int = 1) -> int:
        """As ``Acceptance.limit``, except that a drafted token costing a whole step or more
        is never proposed, not even as a probe: then k drafts cost at least k + 1 steps, more
        than the k + 1 tokens they can yield at best (and each probe would feed the draft)."""
        if self.row_cost_in(batch) >= 1.0:
            return 0
        return super().limit(k, batch)


@dataclass
class _DraftState:
    tokens: list[int] = field(default_factory=list)   # whose K/V the draft cache holds, in order
    pages: list[int] = field(default_factory=list)    # page ids covering positions [0, len(tokens))
    context_len: int = 0       # context length at the last propose (all of it was true then)
    acceptance: DraftAcceptance = field(default_factory=DraftAcceptance)


class DraftModelProposer:
    """Greedy drafts from a smaller model with its own paged KV (see the module docstring).

    ``model``: a GGUF file or Hugging Face directory the loader reads; its vocabulary size must
    equal ``vocab_size`` (the target's), else ValueError. ``dtype``: the draft's compute dtype
    (the target's, normally). ``quantization``: how its weights run (``model/loader.py``);
    "gguf" by default, so a quantized GGUF draft runs as stored (other files are unaffected).
    ``draft_kv_tokens``: the draft cache's size in tokens, over all requests.
    ``draft_cost``: fixed cost of a drafted token's draft forward in target 1-row steps; None
    measures it (see ``on_target_step``). ``row_cost``: as in ``Acceptance``.
    ``prefill_chunk``: the longest chunk fed to the draft in one forward. ``clock``: what
    the draft's forwards are timed with (the engine's step listener reports its own clock's
    seconds: the two should agree).
    """

    def __init__(self, model: str | Path, *, vocab_size: int,
                 dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
                 quantization: str | None = "gguf",
                 draft_kv_tokens: int = 8192, block_size: int = 16,
                 draft_cost: float | None = None, row_cost: float = Acceptance.row_cost,
                 prefill_chunk: int = 512, kernels: str | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        from tokenfactory.model.runner import TorchExecutor

        if draft_kv_tokens < block_size:
            raise ValueError(f"draft_kv_tokens ({draft_kv_tokens}) must hold at least one page "
                             f"of {block_size} tokens")
        if torch.device(device).type != "cpu" and quantization == "gguf":
            quantization = None   # quantized blocks run on CPU only: dequantize elsewhere
        self.name = "draft"
        self.executor = TorchExecutor(model, dtype=dtype, device=device,
                                      quantization=quantization, kernels=kernels)
        draft_vocab = self.executor.model_config.vocab_size
        if draft_vocab != vocab_size:
            raise ValueError(f"draft model {model}: vocabulary of {draft_vocab} tokens, but the "
                             f"target's has {vocab_size}; a draft must share the target's "
                             "tokenizer")
        self.block_size = block_size
        self.num_pages = draft_kv_tokens // block_size
        self.executor.initialize_cache(self.num_pages, block_size)
        self.max_model_len = self.executor.max_model_len
        self.row_cost = row_cost
        self.prefill_chunk = max(1, prefill_chunk)
        self._fixed_cost = draft_cost
        self._free: list[int] = list(range(self.num_pages - 1, -1, -1))   # pop() -> page 0 first
        self._states: OrderedDict[str, _DraftState] = OrderedDict()      # least recent first
        self._greedy = SamplingParams(temperature=0.0, max_tokens=1)
        self._draft_s_per_token: float | None = None    # measured, per drafted token
        self._target_step_s: float | None = None        # measured, a 1-row target step
        self._clock = clock
        self.num_evictions = 0
        self.prefill_seconds = 0.0         # spent feeding prompts and long catch-ups (untimed)
        self.draft_tokens_computed = 0     # positions the draft has run (prefill + decode)

    # ------------------------------------------------------------------ cost
    @property
    def measured_draft_cost(self) -> float | None:
        """The draft's measured seconds per drafted token over the target's 1-row decode step
        (None until both were timed)."""
        if self._draft_s_per_token is None or not self._target_step_s:
            return None
        return self._draft_s_per_token / self._target_step_s

    @property
    def draft_cost(self) -> float:
        """A drafted token's draft forward in target 1-row decode steps, as the cost model
        uses it: the fixed ``draft_cost`` if one was given, else measured, else the prior."""
        if self._fixed_cost is not None:
            return self._fixed_cost
        measured = self.measured_draft_cost
        return DRAFT_COST_PRIOR if measured is None else measured

    def on_target_step(self, seconds: float, tokens: dict[str, int]) -> None:
        """Engine step listener: learn a target 1-row decode step's time from small steps
        (a step of r rows costs about ``1 + row_cost * (r - 1)`` 1-row steps)."""
        rows = sum(tokens.values())
        if seconds <= 0 or not 0 < rows <= _MAX_TIMED_ROWS:
            return
        one_row = seconds / (1.0 + self.row_cost * (rows - 1))
        prev = self._target_step_s
        self._target_step_s = one_row if prev is None else _EMA * prev + (1 - _EMA) * one_row

    def _time_draft(self, seconds: float, num_drafts: int) -> None:
        per = seconds / num_drafts
        prev = self._draft_s_per_token
        self._draft_s_per_token = per if prev is None else _EMA * prev + (1 - _EMA) * per

    # --------------------------------------------------------------- proposer
    def propose(self, request_id: str, token_ids: Sequence[int], k: int,
                batch: int = 1) -> list[int]:
        st = self._states.get(request_id)
        if st is None:
            st = self._states[request_id] = _DraftState(
                acceptance=DraftAcceptance(row_cost=self.row_cost))
        self._states.move_to_end(request_id)
        st.acceptance.draft_cost = self.draft_cost
        k = st.acceptance.limit(k, batch) if k > 0 else 0
        n = len(token_ids)
        k = min(k, self.max_model_len - n + 1)   # the last draft fed sits at position n + k - 2
        if k <= 0 or n == 0:
            return []
        self._sync(st, token_ids)
        if not self._reserve(request_id, st, _cdiv(n + k - 1, self.block_size)):
            return []
        tail = n - len(st.tokens)
        t0 = self._clock()
        try:
            drafts = self._run(st, token_ids, k)
        except Exception:   # noqa: BLE001 - a failing draft must not fail the target's step
            log.exception("draft model failed on request %s; no drafts this step", request_id)
            self._release(st)
            return []
        seconds = self._clock() - t0
        if tail <= _MAX_TIMED_TAIL:   # kept drafts + the target's token, or a short catch-up
            # after a pause: timed; a prompt's prefill is not a per-draft cost
            self._time_draft(seconds, len(drafts))
        else:
            self.prefill_seconds += seconds
        st.context_len = n
        return drafts

    def observe(self, request_id: str, accepted: int, proposed: int) -> None:
        """Cut the cache back to the context plus the kept drafts (the target's own token
        that follows them is fed on the next call)."""
        st = self._states.get(request_id)
        if st is None:
            return
        st.acceptance.update(accepted, proposed)
        self._truncate(st, st.context_len + max(0, accepted))

    def finished(self, request_id: str) -> None:
        st = self._states.pop(request_id, None)
        if st is not None:
            self._release(st)

    # ------------------------------------------------------------- internals
    def _sync(self, st: _DraftState, token_ids: Sequence[int]) -> None:
        """Keep only the cached tokens that are a prefix of ``token_ids``, and never all of
        them: the last context token is fed again to get the logits after it. The last call's
        context was all true then, so only its last token (a request id reused for other text)
        and the cached drafts past it need comparing."""
        n, c = len(token_ids), st.context_len
        if c and (n < c or len(st.tokens) < c or st.tokens[c - 1] != token_ids[c - 1]):
            self._release(st)
            c = 0
        keep = min(len(st.tokens), n - 1)
        for i in range(c, keep):
            if st.tokens[i] != token_ids[i]:
                keep = i
                break
        self._truncate(st, keep)

    def _truncate(self, st: _DraftState, length: int) -> None:
        if len(st.tokens) > length:
            del st.tokens[length:]
        keep_pages = _cdiv(len(st.tokens), self.block_size)
        if len(st.pages) > keep_pages:
            self._free.extend(reversed(st.pages[keep_pages:]))
            del st.pages[keep_pages:]

    def _release(self, st: _DraftState) -> None:
        st.tokens.clear()
        st.context_len = 0
        self._truncate(st, 0)

    def _reserve(self, request_id: str, st: _DraftState, pages: int) -> bool:
        """Give ``st`` ``pages`` pages, taking the least recently used requests' when the pool
        is short. False (and the request's own pages freed) when the pool cannot hold it."""
        if pages > self.num_pages:
            self._release(st)
            return False
        need = pages - len(st.pages)
        if need > len(self._free):
            for rid, other in list(self._states.items()):
                if len(self._free) >= need:
                    break
                if rid != request_id and other.pages:
                    self._release(other)
                    self.num_evictions += 1
        for _ in range(max(0, need)):
            st.pages.append(self._free.pop())
        return True

    def _forward(self, st: _DraftState, tokens: list[int], sample: bool) -> int | None:
        """Feed ``tokens`` after the cached ones; the greedy next token when ``sample``.

        A short run (a decode token, or the kept drafts plus the target's token) goes as one
        position per row: the first as the step's token, the rest as the chunk's further
        positions (``draft_token_ids``), which ``forward_logits`` runs as rows of the native
        decode step where the model has one (the kernels that verify drafts), not as a prefill
        chunk through the torch path; its few rows of logits are cheap. A longer run (a prompt)
        goes through ``execute`` with greedy sampling: logits of its last row only."""
        start = len(st.tokens)
        if sample and len(tokens) <= _MAX_ROW_RUN:
            sched = ScheduledRequest(_EXECUTOR_ID, tokens[:1], start, st.pages, sample=True,
                                     sampling_params=self._greedy, output_index=0,
                                     draft_token_ids=tokens[1:])
            logits = self.executor.forward_logits(StepPlan([sched], self.block_size))[0][-1]
            token = int(logits.argmax())                                   # logits: (V,)
            if not torch.isfinite(logits[token]):
                raise RuntimeError("the draft model produced non-finite logits")
        else:
            sched = ScheduledRequest(
                _EXECUTOR_ID, tokens, start, st.pages, sample=sample,
                sampling_params=self._greedy, output_index=len(tokens),
                new=NewRequestData(st.tokens, []))
            # the executor's sequence state is rebuilt from ``new`` every time (finished
            # first): the draft's own bookkeeping (rollback) lives here, not there
            out = self.executor.execute(StepPlan([sched], self.block_size,
                                                 finished_ids=[_EXECUTOR_ID])).outputs[0]
            if out.error is not None:
                raise RuntimeError(out.error)
            token = out.token_ids[0] if sample else None
        st.tokens.extend(tokens)
        self.draft_tokens_computed += len(tokens)
        return token

    def _run(self, st: _DraftState, token_ids: Sequence[int], k: int) -> list[int]:
        """Prefill the uncached tail (in chunks), then k - 1 one-token decode steps."""
        n = len(token_ids)
        start = len(st.tokens)
        while n - start > self.prefill_chunk:
            self._forward(st, [int(t) for t in token_ids[start:start + self.prefill_chunk]],
                          sample=False)
            start += self.prefill_chunk
        drafts = [self._forward(st, [int(t) for t in token_ids[start:n]], sample=True)]
        while len(drafts) < k:
            drafts.append(self._forward(st, [drafts[-1]], sample=True))
        return [int(t) for t in drafts]

    # ---------------------------------------------------------- introspection
    @property
    def num_requests(self) -> int:
        return len(self._states)

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def cached_tokens(self, request_id: str) -> list[int]:
        """The tokens whose K/V the draft cache holds for a request (tests, debugging)."""
        st = self._states.get(request_id)
        return list(st.tokens) if st is not None else []
