"""The proposer interface and the per-request acceptance policy every proposer shares."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable


@runtime_checkable
class Proposer(Protocol):
    name: str

    def propose(self, request_id: str, token_ids: Sequence[int], k: int,
                batch: int = 1) -> list[int]:
        """Up to ``k`` draft ids to follow ``token_ids`` (prompt + output so far); [] for none.
        ``batch``: decoding requests sharing the step (a drafted row costs more against a
        request's share of a larger step, see ``Acceptance.step_cost``)."""

    def observe(self, request_id: str, accepted: int, proposed: int) -> None:
        """Verification kept ``accepted`` of the ``proposed`` draft tokens."""

    def finished(self, request_id: str) -> None:
        """The request is done (or aborted): forget its state."""


@dataclass
class Acceptance:
    """Per-request acceptance history deciding how many tokens to propose: the draft length
    that makes the most tokens per unit of step time.

    Why a cost model: verifying a draft is not free. Measured on SmolLM2 (bfloat16, native
    decode step, one core of this Zen 4 host, ``benchmarks/spec_decode.py --step-cost``): a
    decode step with 1 row costs 9.6 ms at a 128-token context and 11.6 ms at 2K; 8 rows (7
    drafted positions) cost 1.99x and 2.53x of it, so each further row adds 1.4 ms (0.14 of a
    step) at 128 and 2.5 ms (0.22) at 2K: the weights are read once for all rows, a row's
    linear work is what remains, and at 2K its attention (the rows of one request read their
    pages together, but each row computes over the whole context). The edit and agentic
    workloads decode at 1.5-4K. So a draft of k tokens costs ``1 + row_cost * k`` steps,
    and yields ``E(k) = 1 + p + ... + p^k`` tokens when each draft token is accepted with
    probability p (given the ones before it). ``limit`` proposes the k in 0..K that maximizes
    ``E(k) / (1 + row_cost * k)``: long drafts only when acceptance is high, none when
    p < row_cost (then even one draft token loses time). In a step shared by several decoding
    requests a row costs more against each one's share (``row_cost_in``).

    p is estimated per request from decayed counts of accepted draft tokens (``hits``) and
    rejections (``misses``: a draft cut short by a wrong token), starting from a weak prior. When the best k is 0 the request pauses for ``cooldown`` steps and then probes with
    one token; each further failure doubles the pause (up to ``max_cooldown``), a success
    resets it. On text that never repeats this keeps drafts to a small fraction of steps.
    """

    row_cost: float = 0.2             # one drafted row, in units of a 1-row decode step
    decay: float = 0.8                # weight kept by the old counts per observation
    prior_hits: float = 1.5           # start: p = 0.6, worth 2.5 drafts (one-token drafts
    prior_misses: float = 1.0         # at first; a run of accepted ones grows them fast)
    base_cooldown: int = 4
    max_cooldown: int = 256
    hits: float = -1.0                # decayed accepted draft tokens (-1: use the prior)
    misses: float = 0.0               # decayed rejections
    cooldown: int = 0                 # steps left without proposals
    next_cooldown: int = 0
    probing: bool = False             # the pause is over: propose at least one token

    @property
    def p(self) -> float:
        """Estimated probability that the next draft token is accepted."""
        if self.hits < 0:
            return self.prior_hits / (self.prior_hits + self.prior_misses)
        return self.hits / (self.hits + self.misses) if self.hits + self.misses > 0 else 0.0

    def row_cost_in(self, batch: int) -> float:
        """A drafted row's cost against one request's share of a decode step of ``batch``
        requests: the step costs about ``1 + (batch - 1) * row_cost`` 1-row steps (each further
        row, drafted or another request's, costs ``row_cost``), a request's share is that over
        ``batch``. Batch 1: ``row_cost``; batch 8 at 0.2: 0.67, so only likely drafts pay."""
        b = max(1, batch)
        return b * self.row_cost / (1.0 + (b - 1) * self.row_cost)

    def best_length(self, k: int, batch: int = 1) -> int:
        """The draft length in 0..k with the most expected tokens per unit of step time."""
        cost = self.row_cost_in(batch)
        p, best, best_rate = self.p, 0, 1.0
        expected, term = 1.0, 1.0
        for j in range(1, k + 1):
            term *= p
            expected += term
            rate = expected / (1.0 + cost * j)
            if rate > best_rate * (1.0 + 1e-9):
                best, best_rate = j, rate
        return best

    def limit(self, k: int, batch: int = 1) -> int:
        """How many tokens to propose this step (0: pausing). Counts one step of any pause."""
        if self.cooldown > 0:
            self.cooldown -= 1
            if self.cooldown == 0:
                self.probing = True
            return 0
        best = self.best_length(k, batch)
        if best > 0:
            return best
        if self.probing:
            return min(1, k)
        self.next_cooldown = min(self.max_cooldown, max(self.base_cooldown,
                                                        2 * self.next_cooldown))
        self.cooldown = self.next_cooldown - 1
        self.probing = self.cooldown == 0
        return 0

    def update(self, accepted: int, proposed: int) -> None:
        if proposed <= 0:
            return
        accepted = max(0, min(accepted, proposed))
        if self.hits < 0:
            self.hits, self.misses = self.prior_hits, self.prior_misses
        d = self.decay
        self.hits = d * self.hits + accepted
        self.misses = d * self.misses + (1.0 if accepted < proposed else 0.0)
        self.probing = False
        if accepted > 0:
            self.next_cooldown = 0


class TokenView(Sequence[int]):
    """prompt + output as one read-only sequence without copying either list: what the engine
    passes as ``token_ids`` (``request.all_token_ids`` builds a new list, O(context) per step,
    which would undo the proposers' incremental indexing). Reads the lists live, so it may be
    built once per request and reused while the output grows."""

    def __init__(self, prompt: Sequence[int], output: Sequence[int]):
        self.prompt, self.output = prompt, output

    def __len__(self) -> int:
        return len(self.prompt) + len(self.output)

    def __getitem__(self, i):
        n = len(self.prompt)
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return [self[j] for j in range(start, stop, step)]
            if stop <= n:
                return list(self.prompt[start:stop])
            if start >= n:
                return list(self.output[start - n:stop - n])
            return list(self.prompt[start:]) + list(self.output[:stop - n])
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError("TokenView index out of range")
        return self.prompt[i] if i < n else self.output[i - n]
