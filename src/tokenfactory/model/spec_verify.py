"""Verify draft tokens against the target model's logits: which proposed tokens to keep.

For one request that proposed ``d = draft_ids`` (k tokens), the target computes k + 1 rows of
logits in one pass: row j is the distribution of the token after ``context + d[:j]``. The
accepted output is ``d[:m] + [t]``: the m leading drafts the target agrees with, then one token
of the target's own (a correction where it disagreed, a bonus token when all k were kept), so a
step yields 1..k+1 tokens. Row j of ``logits`` produced output token j, so logprobs of the
accepted tokens come from rows ``0..len(tokens)-1``.

- Greedy: row j's argmax (after logit_bias, penalties and min_tokens, as ``model/sampler.py``)
  is the token; drafts are kept while they equal it. The output is the greedy output without speculation.
- Sampling, drafts without a distribution (n-gram, suffix: q is a point mass on d_j): the
  rejection rule accepts d_j with probability p_j(d_j) and otherwise samples from p_j with d_j
  removed and renormalized. Drawing x ~ p_j and keeping d_j iff x == d_j is that rule exactly
  (P(keep) = p_j(d_j); given a rejection, x is distributed as the residual), and with the
  generator the sampler would have used for that output position it draws the very token plain
  sampling draws: seeded requests give the same text with or without speculation.
- Sampling, drafts with a distribution q (a draft model, ``draft_probs``): the standard rule
  (Leviathan et al. 2023; Chen et al. 2023), keep d_j with probability min(1, p(d_j)/q(d_j)),
  otherwise sample from max(0, p - q) renormalized; the bonus row samples from p.

p_j is the distribution plain sampling uses: logit_bias, penalties (counting the drafts before j
as output) and min_tokens, then temperature, top-k, top-p, min-p, all with ``model/sampler.py``'s functions.
Structured-output grammars are not handled here: the engine does not speculate for requests with
a grammar (``can_verify``).

API::

    v = verify(logits, draft_ids, request)            # request: what Sampler needs of one
    v.token_ids, v.num_accepted_drafts, v.error
    batch = verify_batch(logits, drafts, requests)    # rows of all requests, concatenated
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from tokenfactory.model.sampler import (apply_logit_bias, apply_min_tokens, apply_penalties,
                                         derive_seed, filter_logits, unsampleable_rows)

_NON_FINITE = "the model produced non-finite logits (NaN or +inf) for this request"


@dataclass
class Verification:
    token_ids: list[int]               # accepted drafts, then the target's own token
    num_accepted_drafts: int           # how many of the proposed tokens were kept
    num_proposed: int
    error: str | None = None           # set when not even the first token could be sampled


@dataclass
class _RowView:
    """What the sampler's penalty and min_tokens functions read of a request, at draft row j:
    its output as if the first j drafts were already accepted. A fresh ``sampler_cache`` keeps
    the request's own incremental penalty state untouched."""
    sampling_params: Any
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: Any
    stop_token_set: Any
    sampler_cache: dict = field(default_factory=dict)


def can_verify(request) -> bool:
    """Whether ``verify`` handles this request's sampling: everything but a grammar."""
    return getattr(request, "grammar", None) is None


def _processed_rows(logits: torch.Tensor, draft_ids: Sequence[int], request) -> torch.Tensor:
    """Rows after logit_bias, penalties and min_tokens, in the sampler's order (a copy only when
    one applies). logits: (R, V)."""
    params = request.sampling_params
    if not _needs_processing(request):
        return logits
    bias = bool(params.logit_bias)
    logits = logits.clone()
    for j in range(logits.shape[0]):
        view = _RowView(params, list(request.prompt_token_ids),
                        list(request.output_token_ids) + [int(t) for t in draft_ids[:j]],
                        request.eos_token_ids, request.stop_token_set)
        row = logits[j:j + 1]
        if bias:
            row = apply_logit_bias(row, [view])
        apply_min_tokens(apply_penalties(row, [view]), [view])
    return logits


def _needs_processing(request) -> bool:
    params = request.sampling_params
    return (params.needs_penalties or len(request.output_token_ids) < params.min_tokens
            or bool(params.logit_bias))


def _accept_greedy(argmax: list[int], ok: list[bool], draft_ids: Sequence[int]) -> Verification:
    """Greedy acceptance from each row's argmax; ``ok[j]`` is False for a row that cannot be
    sampled, which ends the output there."""
    k = len(draft_ids)
    out: list[int] = []
    accepted = 0
    for j, tok in enumerate(argmax):
        if not ok[j]:
            break
        out.append(tok)
        if j == k or tok != draft_ids[j]:
            break
        accepted += 1
    return Verification(out, accepted, k, None if out else _NON_FINITE)


def _probs(rows: torch.Tensor, params) -> torch.Tensor:
    """Sampling distributions of (R, V) processed logits, as ``Sampler._sample_rows`` makes them."""
    n = rows.shape[0]
    scaled = rows / params.temperature
    overflow = unsampleable_rows(scaled)
    if bool(overflow.any()):   # 1/T overflowed: shift by the row maximum first, as the sampler
        sub = rows[overflow]
        scaled[overflow] = (sub - sub.max(dim=-1, keepdim=True).values) / params.temperature
    scaled = filter_logits(scaled, torch.full((n,), params.top_k, dtype=torch.int64),
                           torch.full((n,), params.top_p), torch.full((n,), params.min_p))
    return scaled.softmax(dim=-1)


def _generator(request, position: int, shared: torch.Generator | None) -> torch.Generator | None:
    """The generator plain sampling would use for output ``position``: seeded requests derive
    one from (seed, position); others share the engine's."""
    seed = request.sampling_params.seed
    if seed is None:
        return shared
    gen = torch.Generator()
    gen.manual_seed(derive_seed(seed, position))
    return gen


def verify(logits: torch.Tensor, draft_ids: Sequence[int], request,
           generator: torch.Generator | None = None,
           draft_probs: torch.Tensor | None = None) -> Verification:
    """Accepted tokens for one request. logits: (k + 1, V) float32 target logits, row j after
    ``draft_ids[:j]``; request: has sampling_params, prompt_token_ids, output_token_ids (before
    this step), eos_token_ids, stop_token_set; generator: the engine's shared generator for
    unseeded sampling; draft_probs: (k, V) draft distributions, or None for point-mass drafts.
    A row that cannot be sampled ends the output there (the error is set only if it is row 0)."""
    k = len(draft_ids)
    if logits.dim() != 2 or logits.shape[0] != k + 1:
        raise ValueError(f"verify: need {k + 1} rows of logits for {k} drafts, "
                         f"got shape {tuple(logits.shape)}")
    params = request.sampling_params
    bad = unsampleable_rows(logits).tolist()
    rows = _processed_rows(logits, draft_ids, request)
    n_out = len(request.output_token_ids)
    out: list[int] = []
    accepted = 0
    if params.greedy:
        best, argmax = rows.max(dim=-1)                                       # (k + 1,)
        ok = [not b and f for b, f in zip(bad, torch.isfinite(best).tolist())]
        return _accept_greedy(argmax.tolist(), ok, draft_ids)
    for j in range(k + 1):
        if bad[j]:
            break
        p = _probs(rows[j:j + 1], params)[0]                                  # (V,)
        if not bool(torch.isfinite(p).all()) or float(p.sum()) <= 0:
            break
        gen = _generator(request, n_out + j, generator)
        if j == k:                                  # every draft kept: the bonus token
            out.append(int(torch.multinomial(p, 1, generator=gen)[0]))
            break
        d = int(draft_ids[j])
        if draft_probs is None:                     # point mass: x ~ p, keep d iff x == d
            tok = int(torch.multinomial(p, 1, generator=gen)[0])
            out.append(tok)
            if tok != d:
                break
            accepted += 1
            continue
        q = draft_probs[j]                                                    # (V,)
        u = float(torch.rand((), generator=gen))
        if float(q[d]) > 0 and u < min(1.0, float(p[d] / q[d])):
            out.append(d)
            accepted += 1
            continue
        residual = (p - q).clamp(min=0)
        if float(residual.sum()) <= 0:
            residual = p
        out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=gen)[0]))
        break
    return Verification(out, accepted, k, None if out else _NON_FINITE)


def verify_batch(logits: torch.Tensor, drafts: Sequence[Sequence[int]], requests: Sequence,
                 generator: torch.Generator | None = None) -> list[Verification]:
    """``verify`` for many requests whose rows are concatenated: request i owns
    ``len(drafts[i]) + 1`` consecutive rows of logits (sum of k_i + 1, V). Plain greedy
    requests (no penalties, bias or min_tokens pending) share one argmax over all rows."""
    need = sum(len(d) + 1 for d in drafts)
    if logits.dim() != 2 or logits.shape[0] != need or len(drafts) != len(requests):
        raise ValueError(f"verify_batch: need {need} rows of logits for {len(requests)} "
                         f"requests, got shape {tuple(logits.shape)} and {len(drafts)} drafts")
    plain = [r.sampling_params.greedy and not _needs_processing(r) for r in requests]
    argmax: list[int] = []
    ok: list[bool] = []
    if any(plain):
        best, top = logits.max(dim=-1)                                        # (rows,)
        argmax = top.tolist()
        ok = (torch.isfinite(best) & ~unsampleable_rows(logits)).tolist()
    out, start = [], 0
    for draft, req, is_plain in zip(drafts, requests, plain):
        stop = start + len(draft) + 1
        if is_plain:
            out.append(_accept_greedy(argmax[start:stop], ok[start:stop], draft))
        else:
            out.append(verify(logits[start:stop], draft, req, generator))
        start = stop
    return out
