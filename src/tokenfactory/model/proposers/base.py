"""The proposer interface and the per-request acceptance policy every proposer shares."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable


@runtime_checkable
class Proposer(Protocol):
    name: str

    def propose(self, request_id: str, token_ids: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` draft ids to follow ``token_ids`` (prompt + output so far); [] for none."""

    def observe(self, request_id: str, accepted: int, proposed: int) -> None:
        """Verification kept ``accepted`` of the ``proposed`` draft tokens."""

    def finished(self, request_id: str) -> None:
        """The request is done (or aborted): forget its state."""


@dataclass
class Acceptance:
    """Per-request acceptance history deciding how many tokens to propose.

    ``mean_accepted`` is an exponential moving average of tokens accepted per draft, starting
    optimistic (at k). The next draft is at most ``2 * mean_accepted + 1`` long: drafts a bit
    longer than what usually gets through, so a rising acceptance can grow them again. When the
    average acceptance *rate* falls below ``min_rate``, the request stops proposing for
    ``cooldown`` steps; each further failure doubles the cooldown (up to ``max_cooldown``), a
    success resets it. Drafts are never free (the target computes every proposed position), so
    on text that never repeats this keeps the proposed tokens to a small fraction of steps.
    """

    decay: float = 0.5                # weight of the newest observation
    min_rate: float = 0.2
    base_cooldown: int = 4
    max_cooldown: int = 256
    mean_accepted: float | None = None
    rate: float = 1.0
    cooldown: int = 0                 # steps left without proposals
    next_cooldown: int = 0

    def limit(self, k: int) -> int:
        """How many tokens to propose this step (0: pausing). Counts one step of any pause."""
        if self.cooldown > 0:
            self.cooldown -= 1
            return 0
        if self.mean_accepted is None:
            return k
        return max(1, min(k, math.floor(2 * self.mean_accepted) + 1))

    def update(self, accepted: int, proposed: int) -> None:
        if proposed <= 0:
            return
        accepted = max(0, min(accepted, proposed))
        a = self.decay
        prev = proposed if self.mean_accepted is None else self.mean_accepted
        self.mean_accepted = (1 - a) * prev + a * accepted
        self.rate = (1 - a) * self.rate + a * (accepted / proposed)
        if self.rate < self.min_rate:
            self.next_cooldown = min(self.max_cooldown, max(self.base_cooldown,
                                                            2 * self.next_cooldown))
            self.cooldown = self.next_cooldown
            self.rate = self.min_rate          # one good draft after the pause lifts it again
        elif accepted > 0:
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
