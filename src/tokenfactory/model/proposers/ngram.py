"""N-gram prompt lookup: propose what followed the latest earlier occurrence of the
context's last n tokens."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from tokenfactory.model.proposers.base import Acceptance


@dataclass
class _NgramState:
    index: dict[tuple[int, ...], int] = field(default_factory=dict)  # n-gram -> next position
    length: int = 0                   # tokens of the context indexed so far
    last: int | None = None           # token at length-1, to notice a context that changed
    acceptance: Acceptance = field(default_factory=Acceptance)


class NgramProposer:
    """Prompt lookup: the last n tokens (longest n first) matched against the request's own
    prompt + output; the draft is what followed their most recent earlier occurrence.

    The index maps every n-gram that has a following token to the position right after its
    latest occurrence; it is updated as tokens arrive, so a lookup is ``max_n - min_n + 1``
    dictionary probes. The current suffix itself is indexed only once its next token exists,
    so a match is always an earlier occurrence with a continuation.
    """

    def __init__(self, min_n: int = 2, max_n: int = 4, row_cost: float = Acceptance.row_cost):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"ngram proposer: need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.name = "ngram"
        self.min_n, self.max_n = min_n, max_n
        self.row_cost = row_cost          # a drafted row's cost in 1-row steps (Acceptance)
        self._states: dict[str, _NgramState] = {}

    def _index(self, state: _NgramState, token_ids: Sequence[int]) -> None:
        n_tokens = len(token_ids)
        if n_tokens < state.length or (state.length and token_ids[state.length - 1] != state.last):
            state.index.clear()                # not an extension of what was indexed: rebuild
            state.length = 0
        index = state.index
        for p in range(max(state.length, 1), n_tokens):   # token p follows the n-grams before it
            for n in range(self.min_n, min(self.max_n, p) + 1):
                index[tuple(token_ids[p - n:p])] = p
        state.length = n_tokens
        state.last = token_ids[-1] if n_tokens else None

    def propose(self, request_id: str, token_ids: Sequence[int], k: int,
                batch: int = 1) -> list[int]:
        state = self._states.get(request_id)
        if state is None:
            state = self._states[request_id] = _NgramState(
                acceptance=Acceptance(row_cost=self.row_cost))
        self._index(state, token_ids)
        k = state.acceptance.limit(k, batch) if k > 0 else 0
        if k <= 0:
            return []
        n_tokens = len(token_ids)
        for n in range(min(self.max_n, n_tokens), self.min_n - 1, -1):
            pos = state.index.get(tuple(token_ids[n_tokens - n:]))
            if pos is not None:
                return [int(t) for t in token_ids[pos:pos + k]]
        return []

    def observe(self, request_id: str, accepted: int, proposed: int) -> None:
        state = self._states.get(request_id)
        if state is not None:
            state.acceptance.update(accepted, proposed)

    def finished(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    @property
    def num_requests(self) -> int:
        return len(self._states)
