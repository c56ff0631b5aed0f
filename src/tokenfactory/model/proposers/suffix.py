"""Suffix decoding: the most frequent continuation of the context's longest matched suffix,
looked up in a suffix trie over the request's own context and in one over recent outputs of
other requests (after SuffixDecoding, Oliaro et al. 2024, built for agent loops).

Both tries are depth-bounded (``max_depth`` tokens from the root) and count occurrences, so a
node's children say how often each token followed that string. A draft walks down from the
deepest node matching the end of the context, always to the most frequent child, while the
path's estimated probability (the product of child frequency / all continuations) stays at or
above ``min_prob``, for at most ``alpha * match length`` tokens: a long match earns a long draft,
a one-token match a short one. Of the two tries' drafts the one with the larger expected number
of accepted tokens (the sum of the path probabilities) wins.

Memory is bounded: a request indexes at most ``max_request_tokens`` of its latest context (when
it has more, its trie is rebuilt from the latest half), the global store at most
``max_global_tokens`` tokens of finished requests' outputs (oldest dropped first, the trie rebuilt
from the rest when a quarter of the budget is gone), each costing at most ``max_depth`` nodes per
token. Rebuilding keeps every trie insert-only, which is what lets a node remember its most
frequent child instead of searching its children.
"""
from __future__ import annotations

from collections import deque
from itertools import chain
from dataclasses import dataclass, field
from typing import Sequence

from tokenfactory.model.proposers.base import Acceptance

_SHIFT = 32          # edge key: (node << _SHIFT) | token; token ids are below 2**32


class SuffixTrie:
    """An insert-only, depth-bounded suffix trie with occurrence counts. Node 0 is the root.

    ``count[n]``: occurrences of node n's string; ``total[n]``: occurrences followed by another
    token (the sum of the children's counts); ``best[n]``: the child with the highest count (on a
    tie the one reaching it most recently, so recent text wins), -1 for a leaf. Edges live in one
    dict keyed by (node, token), far smaller than a dict per node.
    """

    def __init__(self, max_depth: int):
        self.max_depth = max_depth
        self.edges: dict[int, int] = {}
        self.count: list[int] = [0]
        self.total: list[int] = [0]
        self.best: list[int] = [-1]
        self.token: list[int] = [-1]          # the token on the edge into each node

    @property
    def num_nodes(self) -> int:
        return len(self.count)

    def child(self, node: int, token: int) -> int:
        """The child of ``node`` along ``token``, or -1."""
        return self.edges.get((node << _SHIFT) | token, -1)

    def extend(self, active: list[int], token: int) -> list[int]:
        """Append ``token`` to a text whose suffix nodes are ``active`` (``active[d-1]`` is the
        node of its last d tokens): count one more occurrence of each suffix followed by
        ``token``, and return the new text's suffix nodes. The hot loop of the proposer (one
        pass per token over up to ``max_depth`` nodes), hence the local names."""
        edges, count, total, best = self.edges, self.count, self.total, self.best
        out: list[int] = []
        for node in chain((0,), active[:self.max_depth - 1]):
            key = (node << _SHIFT) | token
            c = edges.get(key)
            if c is None:
                c = edges[key] = len(count)
                count.append(0)
                total.append(0)
                best.append(-1)
                self.token.append(token)
            count[c] += 1
            total[node] += 1
            b = best[node]
            if b < 0 or count[c] >= count[b]:
                best[node] = c
            out.append(c)
        return out

    def insert(self, tokens: Sequence[int]) -> list[int]:
        """Index every suffix of ``tokens`` (up to ``max_depth`` long); returns the suffix nodes."""
        active: list[int] = []
        for t in tokens:
            active = self.extend(active, int(t))
        return active

    def walk(self, tokens: Sequence[int]) -> int:
        """The node of ``tokens`` read from the root, or -1."""
        node = 0
        for t in tokens:
            node = self.child(node, int(t))
            if node < 0:
                return -1
        return node

    def draft(self, node: int, limit: int, min_prob: float) -> tuple[list[int], float]:
        """The most frequent continuation of ``node``: up to ``limit`` tokens while the path's
        probability stays >= ``min_prob``. Returns (tokens, expected accepted tokens)."""
        out: list[int] = []
        prob, score = 1.0, 0.0
        while len(out) < limit and self.total[node] > 0:
            c = self.best[node]
            prob *= self.count[c] / self.total[node]
            if prob < min_prob:
                break
            out.append(self.token[c])
            score += prob
            node = c
        return out, score


@dataclass
class _RequestState:
    trie: SuffixTrie
    tokens: list[int] = field(default_factory=list)   # the context indexed so far
    start: int = 0                   # tokens[start:] are in the trie (a window of the context)
    active: list[int] = field(default_factory=list)   # suffix nodes of the indexed context
    prompt_len: int = -1             # context length at the first call: outputs follow it
    acceptance: Acceptance = field(default_factory=Acceptance)


class SuffixProposer:
    """Suffix-trie proposals over the request's context and recent outputs of other requests."""

    def __init__(self, max_depth: int = 16, max_match: int = 8, alpha: float = 1.0,
                 min_prob: float = 0.1, max_request_tokens: int = 16384,
                 max_global_tokens: int = 16384, max_output_tokens: int = 4096,
                 row_cost: float = Acceptance.row_cost):
        if not 1 <= max_match < max_depth:
            raise ValueError(f"suffix proposer: need 1 <= max_match < max_depth, got "
                             f"{max_match}, {max_depth}")
        if alpha <= 0 or not 0 <= min_prob <= 1:
            raise ValueError("suffix proposer: need alpha > 0 and 0 <= min_prob <= 1")
        self.name = "suffix"
        self.max_depth, self.max_match = max_depth, max_match
        self.alpha, self.min_prob = alpha, min_prob
        self.row_cost = row_cost          # a drafted row's cost in 1-row steps (Acceptance)
        self.max_request_tokens = max(2 * max_depth, max_request_tokens)
        self.max_global_tokens, self.max_output_tokens = max_global_tokens, max_output_tokens
        self._states: dict[str, _RequestState] = {}
        self._outputs: deque[list[int]] = deque()       # finished outputs, oldest first
        self._global_tokens = 0
        self.global_trie = SuffixTrie(max_depth)

    # -------------------------------------------------------------- per-request context

    def _sync(self, state: _RequestState, token_ids: Sequence[int]) -> None:
        """Index the tokens added since the last call (O(max_depth) each)."""
        n_old, n_new = len(state.tokens), len(token_ids)
        if n_new < n_old or (n_old and token_ids[n_old - 1] != state.tokens[-1]):
            state.tokens, state.start, state.active = [], 0, []   # not an extension: rebuild
            state.trie = SuffixTrie(self.max_depth)
            n_old = 0
        new = [int(t) for t in token_ids[n_old:]]
        state.tokens.extend(new)
        if len(state.tokens) - state.start > self.max_request_tokens:
            state.start = len(state.tokens) - self.max_request_tokens // 2
            state.trie = SuffixTrie(self.max_depth)
            state.active = state.trie.insert(state.tokens[state.start:])
            return
        trie, active = state.trie, state.active
        for t in new:
            active = trie.extend(active, t)
        state.active = active

    def _best_draft(self, state: _RequestState, limit: int) -> list[int]:
        candidates = []
        # own context: active[d-1] is the node of the last d tokens, which exists by construction
        for d in range(min(self.max_match, len(state.active)), 0, -1):
            node = state.active[d - 1]
            if state.trie.total[node] > 0:
                candidates.append((d, state.trie, node))
                break
        if self.global_trie.num_nodes > 1:
            ctx = state.tokens
            for d in range(min(self.max_match, len(ctx)), 0, -1):
                node = self.global_trie.walk(ctx[len(ctx) - d:])
                if node >= 0 and self.global_trie.total[node] > 0:
                    candidates.append((d, self.global_trie, node))
                    break
        best: list[int] = []
        best_score = 0.0
        for d, trie, node in candidates:
            n = min(limit, max(1, int(self.alpha * d)))
            draft, score = trie.draft(node, n, self.min_prob)
            if score > best_score:
                best, best_score = draft, score
        return best

    def propose(self, request_id: str, token_ids: Sequence[int], k: int,
                batch: int = 1) -> list[int]:
        state = self._states.get(request_id)
        if state is None:
            state = self._states[request_id] = _RequestState(
                SuffixTrie(self.max_depth), prompt_len=len(token_ids),
                acceptance=Acceptance(row_cost=self.row_cost))
        self._sync(state, token_ids)
        limit = state.acceptance.limit(k, batch) if k > 0 else 0
        if limit <= 0 or not state.tokens:
            return []
        return self._best_draft(state, limit)

    def observe(self, request_id: str, accepted: int, proposed: int) -> None:
        state = self._states.get(request_id)
        if state is not None:
            state.acceptance.update(accepted, proposed)

    def finished(self, request_id: str) -> None:
        """Forget the request; its output (the tokens after its first-seen context) joins the
        global store."""
        state = self._states.pop(request_id, None)
        if state is None or state.prompt_len < 0:
            return
        output = state.tokens[state.prompt_len:][-self.max_output_tokens:]
        if len(output) >= 2:
            self.add_output(output)

    # -------------------------------------------------------------- global store

    def add_output(self, tokens: Sequence[int]) -> None:
        """Remember a finished output for other requests (bounded by ``max_global_tokens``)."""
        tokens = [int(t) for t in tokens][-self.max_global_tokens:]
        self._outputs.append(tokens)
        self._global_tokens += len(tokens)
        if self._global_tokens <= self.max_global_tokens:
            self.global_trie.insert(tokens)
            return
        while self._global_tokens > self.max_global_tokens * 3 // 4:
            self._global_tokens -= len(self._outputs.popleft())
        self.global_trie = SuffixTrie(self.max_depth)
        for seq in self._outputs:
            self.global_trie.insert(seq)

    @property
    def num_requests(self) -> int:
        return len(self._states)

    @property
    def global_tokens(self) -> int:
        return self._global_tokens
