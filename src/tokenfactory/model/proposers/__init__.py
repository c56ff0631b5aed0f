"""Draft-token proposers for speculative decoding: guesses from the context, or a draft model.

The engine asks a proposer, once per step and per speculating request, for up to ``k`` tokens
that probably come next; the target model then checks them all in one forward pass
(``model/spec_verify.py``) and keeps the longest correct prefix plus one token of its own. A
lookup proposal costs no model call: agent loops and edits re-emit long spans of their own
context (files, tool results), and those spans are found by lookup. A draft model guesses any
text, at the price of its own forward passes.

API (everything the engine calls)::

    proposer = make_proposer("ngram" | "suffix")
    proposer = make_proposer("draft:PATH", vocab_size=target_vocab, dtype=target_dtype)
    context = TokenView(request.prompt_token_ids, request.output_token_ids)   # once, no copy
    draft = proposer.propose(request_id, context, k)     # prompt + output so far
    proposer.observe(request_id, accepted, proposed)     # after verification: how many kept
    proposer.finished(request_id)                        # drop the request's state

- ``NgramProposer``: prompt lookup. Match the last n tokens (n from ``max_n`` down to
  ``min_n``) and propose what followed their most recent earlier occurrence.
- ``SuffixProposer``: suffix decoding. A depth-bounded suffix trie over the request's context
  and one over recent outputs of finished requests (bounded by a token budget); propose the most
  frequent continuation of the longest matched suffix, as long as its frequency stays high.
- ``DraftModelProposer`` (``draft.py``): a smaller model sharing the target's vocabulary,
  run greedily for k tokens over a paged KV cache of its own; unlike the lookups its proposals
  cost model time, which its cost model counts.

The lookups are incremental: each call indexes only the tokens added since the previous call
(O(1) per token for n-grams, O(depth) for the trie), never rescanning the context. ``token_ids`` is
expected to grow by appending; if it does not (a request id reused for other text) the state is
rebuilt. All adapt to acceptance per request (``Acceptance``): a request whose drafts keep
being rejected proposes fewer tokens, then pauses with a growing back-off, so text that never
repeats costs almost nothing. Not thread-safe: the engine calls from its step loop only.
"""
from __future__ import annotations

from tokenfactory.model.proposers.base import Acceptance, Proposer, TokenView
from tokenfactory.model.proposers.ngram import NgramProposer
from tokenfactory.model.proposers.suffix import SuffixProposer

PROPOSERS = ("ngram", "suffix", "draft:PATH")


def make_proposer(spec: str, *, vocab_size: int | None = None, dtype=None, device="cpu",
                  **kwargs) -> Proposer:
    """A proposer from its command-line name (``--speculative``): "ngram", "suffix" or
    "draft:PATH" (a GGUF file or Hugging Face directory sharing the target's tokenizer).
    ``vocab_size``, ``dtype``, ``device``: the target's; only a draft model uses them, and it
    needs ``vocab_size`` (a draft whose vocabulary differs is refused). ``kwargs`` go to the
    proposer's constructor (``DraftModelProposer``: ``draft_kv_tokens``, ``quantization``, ...)."""
    name = (spec or "").strip()
    if name == "ngram":
        return NgramProposer(**kwargs)
    if name == "suffix":
        return SuffixProposer(**kwargs)
    if name.startswith("draft:"):
        path = name[len("draft:"):].strip()
        if not path:
            raise ValueError(f"speculative proposer {spec!r}: name the draft model, "
                             "draft:PATH (a GGUF file or a Hugging Face directory)")
        if vocab_size is None:
            raise ValueError(f"speculative proposer {spec!r}: a draft model is checked against "
                             "the target's vocabulary size (vocab_size=)")
        from tokenfactory.model.proposers.draft import DraftModelProposer   # loads torch models
        return DraftModelProposer(path, vocab_size=vocab_size, dtype=dtype, device=device,
                                  **kwargs)
    raise ValueError(f"unknown speculative proposer {spec!r}; use one of {', '.join(PROPOSERS)}")


__all__ = ["Acceptance", "NgramProposer", "PROPOSERS", "Proposer", "SuffixProposer", "TokenView",
           "make_proposer"]
