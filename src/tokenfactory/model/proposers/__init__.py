"""Draft-token proposers for speculative decoding: guesses taken from text already seen.

The engine asks a proposer, once per step and per speculating request, for up to ``k`` tokens
that probably come next; the target model then checks them all in one forward pass
(``model/spec_verify.py``) and keeps the longest correct prefix plus one token of its own. A
proposal costs no model call: agent loops and edits re-emit long spans of their own context
(files, tool results), and those spans are found by lookup.

API (everything the engine calls)::

    proposer = make_proposer("ngram" | "suffix")
    context = TokenView(request.prompt_token_ids, request.output_token_ids)   # once, no copy
    draft = proposer.propose(request_id, context, k)     # prompt + output so far
    proposer.observe(request_id, accepted, proposed)     # after verification: how many kept
    proposer.finished(request_id)                        # drop the request's state

- ``NgramProposer``: prompt lookup. Match the last n tokens (n from ``max_n`` down to
  ``min_n``) and propose what followed their most recent earlier occurrence.
- ``SuffixProposer``: suffix decoding. A depth-bounded suffix trie over the request's context
  and one over recent outputs of finished requests (bounded by a token budget); propose the most
  frequent continuation of the longest matched suffix, as long as its frequency stays high.

Both are incremental: each call indexes only the tokens added since the previous call (O(1) per
token for n-grams, O(depth) for the trie), never rescanning the context. ``token_ids`` is
expected to grow by appending; if it does not (a request id reused for other text) the state is
rebuilt. Both adapt to acceptance per request (``Acceptance``): a request whose drafts keep
being rejected proposes fewer tokens, then pauses with a growing back-off, so text that never
repeats costs almost nothing. Not thread-safe: the engine calls from its step loop only.
"""
from __future__ import annotations

from tokenfactory.model.proposers.base import Acceptance, Proposer, TokenView
from tokenfactory.model.proposers.ngram import NgramProposer
from tokenfactory.model.proposers.suffix import SuffixProposer

PROPOSERS = ("ngram", "suffix")


def make_proposer(spec: str, **kwargs) -> Proposer:
    """A proposer from its command-line name: "ngram" or "suffix" (``--speculative``)."""
    name = (spec or "").strip()
    if name == "ngram":
        return NgramProposer(**kwargs)
    if name == "suffix":
        return SuffixProposer(**kwargs)
    if name.startswith("draft:"):
        raise ValueError(f"speculative proposer {spec!r}: draft-model proposals are not "
                         f"implemented yet; use one of {', '.join(PROPOSERS)}")
    raise ValueError(f"unknown speculative proposer {spec!r}; use one of {', '.join(PROPOSERS)}")


__all__ = ["Acceptance", "NgramProposer", "PROPOSERS", "Proposer", "SuffixProposer", "TokenView",
           "make_proposer"]
