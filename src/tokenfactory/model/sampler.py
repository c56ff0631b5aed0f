"""Batched next-token sampling: one row of logits per request that samples this step.

Order of operations, per row: ``logit_bias`` (OpenAI's: before anything else) -> penalties
(repetition over prompt + output, presence/frequency over output) -> min_tokens masking of
EOS/stop ids -> the structured-output grammar's mask (a row of the step plan's bitmask,
``text/grammar.py`` layout; or, for a row object that carries its own matcher as ``grammar``,
filled here) -> greedy argmax, or temperature -> top-k -> top-p -> min-p -> draw. Logprobs are reported from the raw log-softmax of the model's logits
(vLLM's default), not from the processed distribution.

Seeded requests draw from a generator seeded by (seed, output position) alone, so the token at
position i is the same whichever requests share the batch and however often the request was
preempted and recomputed. Unseeded requests share one global generator.

A row is anything with ``sampling_params``, ``prompt_token_ids``, ``output_token_ids``,
``eos_token_ids``, ``stop_token_set`` and a ``sampler_cache`` dict: the executor's
``engine.step.SequenceState`` (a test may pass an engine ``Request``).

A request is sampled as if it were alone: a row that cannot be sampled (NaN or +inf logits, no
token left, an exception while processing it) gets no token, an entry in
``SamplerOutput.errors`` (and ``sampling_error`` set on the row object), and the engine fails
that request only; the other rows get exactly the
tokens they would have had without it. Extreme but valid parameters never reach a kernel in a
form it cannot take: scaled logits that overflow are recomputed from the row's maximum, and
penalized logits are kept finite.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tokenfactory.engine.request import Logprob, PositionLogprobs

# A row's request as the sampler sees it (see the module docstring).
Row = Any

_MASK64 = (1 << 64) - 1


def derive_seed(seed: int, position: int) -> int:
    """A 63-bit generator seed from (request seed, output position): splitmix64 mixing, so
    nearby (seed, position) pairs give unrelated streams."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


@dataclass
class SamplerOutput:
    token_ids: list[int | None]                # None: the row failed (see errors)
    logprobs: list[PositionLogprobs | None]
    errors: dict[int, str] = field(default_factory=dict)   # row -> why it failed


_NON_FINITE = "the model produced non-finite logits (NaN or +inf) for this request"
_NOTHING_LEFT = "no token is left to sample (every logit is masked)"


def unsampleable_rows(logits: torch.Tensor) -> torch.Tensor:
    """(N,) bool: rows with a NaN or +inf, or without a single finite logit. -inf alone is a
    masked token, not a fault. logits: (N, V)."""
    return ~torch.isfinite(logits.amax(dim=-1))   # amax propagates NaN; all -inf gives -inf


def _cached_ids(req: Row, key: str, ids, vocab: int, device: torch.device) -> torch.Tensor:
    """A request's fixed id list as a unique int64 tensor of in-vocabulary ids, built on first
    use and kept on the request (never rebuilt per step)."""
    entry = req.sampler_cache.get(key)
    if entry is None or entry[0] != vocab or entry[1].device != device:
        t = torch.tensor(sorted({i for i in ids if 0 <= i < vocab}), dtype=torch.int64,
                         device=device)
        entry = req.sampler_cache[key] = (vocab, t)
    return entry[1]


def _penalty_state(req: Row, vocab: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(seen, counts) for a request: seen (V,) bool marks its prompt and output tokens, counts
    (V,) float32 counts its output tokens. Built once from the prompt and then brought up to
    date with the outputs added since the last step (``output_token_ids`` only grows), so a
    long prompt costs nothing per step."""
    out = req.output_token_ids
    state = req.sampler_cache.get("penalties")
    if (state is None or state[0] != vocab or state[1].device != device
            or state[3] > len(out)):
        seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        prompt = torch.tensor(req.prompt_token_ids, dtype=torch.int64, device=device)
        seen[prompt[(prompt >= 0) & (prompt < vocab)]] = True
        state = [vocab, seen, torch.zeros(vocab, dtype=torch.float32, device=device), 0]
        req.sampler_cache["penalties"] = state
    _, seen, counts, done = state
    if done < len(out):
        new = torch.tensor(out[done:], dtype=torch.int64, device=device)
        new = new[(new >= 0) & (new < vocab)]
        seen[new] = True
        counts += torch.bincount(new, minlength=vocab).to(counts.dtype)
        state[3] = len(out)
    return seen, counts


def apply_penalties(logits: torch.Tensor, requests: list[Row]) -> torch.Tensor:
    """In place on rows whose request asks for penalties. logits: (N, V) float32.

    A repetition penalty near 0 divides positive logits by almost nothing: the result is capped
    at the dtype's largest finite value instead of becoming inf (which softmax turns to NaN)."""
    vocab = logits.shape[1]
    fmax = torch.finfo(logits.dtype).max
    for i, req in enumerate(requests):
        p = req.sampling_params
        if not p.needs_penalties:
            continue
        row = logits[i]
        seen, counts = _penalty_state(req, vocab, logits.device)               # (V,), (V,)
        if p.repetition_penalty != 1.0:
            penalized = torch.where(row > 0, (row / p.repetition_penalty).clamp(max=fmax),
                                    row * p.repetition_penalty)
            row.copy_(torch.where(seen, penalized, row))
        if p.frequency_penalty or p.presence_penalty:
            counts = counts.to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    return logits


def apply_logit_bias(logits: torch.Tensor, requests: list[Row]) -> torch.Tensor:
    """Add each request's ``logit_bias`` ({token id: bias}) to its row, in place; ids outside
    the vocabulary are ignored. logits: (N, V) float32."""
    vocab = logits.shape[1]
    for i, req in enumerate(requests):
        bias = getattr(req.sampling_params, "logit_bias", None)
        if not bias:
            continue
        entry = req.sampler_cache.get("logit_bias")
        if entry is None or entry[0] != vocab or entry[1].device != logits.device:
            items = [(t, b) for t, b in bias.items() if 0 <= int(t) < vocab]
            ids = torch.tensor([int(t) for t, _ in items], dtype=torch.int64,
                               device=logits.device)
            vals = torch.tensor([float(b) for _, b in items], dtype=logits.dtype,
                                device=logits.device)
            entry = req.sampler_cache["logit_bias"] = (vocab, ids, vals)
        logits[i].index_add_(0, entry[1], entry[2].to(logits.dtype))
    return logits


def apply_min_tokens(logits: torch.Tensor, requests: list[Row]) -> torch.Tensor:
    """Forbid EOS and stop token ids until a request has ``min_tokens`` outputs."""
    vocab = logits.shape[1]
    for i, req in enumerate(requests):
        p = req.sampling_params
        if len(req.output_token_ids) < p.min_tokens:
            banned = _cached_ids(req, "min_tokens_ban",
                                 req.eos_token_ids | req.stop_token_set, vocab, logits.device)
            if banned.numel():
                logits[i, banned] = float("-inf")
    return logits


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """Set excluded tokens to -inf. logits: (N, V) float32, already temperature-scaled;
    top_k (N,) int (0 = off), top_p (N,) float (1 = off), min_p (N,) float (0 = off).

    top-k keeps the k highest logits; top-p keeps the smallest prefix of the sorted
    distribution whose mass reaches top_p (always at least one token); min-p drops tokens whose
    probability is below min_p times the most likely token's."""
    n, vocab = logits.shape
    if bool((top_k > 0).any()) or bool((top_p < 1.0).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)           # (N, V)
        ranks = torch.arange(vocab, device=logits.device)[None, :]            # (1, V)
        k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)[:, None]   # (N, 1)
        sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs                            # exclusive cumsum
        drop = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    if bool((min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def position_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor,
                      num_top: int) -> list[PositionLogprobs]:
    """logprobs: (N, V) log-softmax rows; chosen: (N,) token per row. Each row's entry holds
    the chosen token and the ``num_top`` most likely ones, with 1-based ranks."""
    chosen_lp = logprobs.gather(1, chosen[:, None])                        # (N, 1)
    chosen_rank = (logprobs > chosen_lp).sum(dim=-1) + 1                   # (N,)
    top_lp, top_ids = (logprobs.topk(num_top, dim=-1) if num_top > 0 else (None, None))
    entries = []
    for r in range(logprobs.shape[0]):
        entry: PositionLogprobs = {}
        if num_top > 0:
            for rank, (tok, lp) in enumerate(zip(top_ids[r].tolist(), top_lp[r].tolist()), 1):
                entry[tok] = Logprob(lp, rank)
        tok = int(chosen[r])
        if tok not in entry:
            entry[tok] = Logprob(float(chosen_lp[r, 0]), int(chosen_rank[r]))
        entries.append(entry)
    return entries


class Sampler:
    def __init__(self, device: torch.device | str = "cpu", seed: int | None = None):
        self.device = torch.device(device)
        self.seed = seed
        self._generator: torch.Generator | None = None

    @property
    def generator(self) -> torch.Generator:
        """The shared generator of unseeded requests, made on first use (a device without
        generators, such as "meta", can still host an executor that never draws)."""
        if self._generator is None:
            self._generator = torch.Generator(self.device)
            if self.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(self.seed)
        return self._generator

    def __call__(self, logits: torch.Tensor, requests: list[Row],
                 grammar_bitmask: torch.Tensor | None = None,
                 grammar_rows: list[int | None] | None = None) -> SamplerOutput:
        """logits: (N, V) float32, one row per request (its next-token logits).

        ``grammar_bitmask`` (G, W) int32 and ``grammar_rows`` (per row: its bitmask row, or
        None) mask structured-output rows to the tokens their grammar allows; the mask is
        applied in place in ``logits``. Never raises for one row's sake: a failing row gets
        token None and an entry in ``errors``; the other rows are unaffected."""
        n = logits.shape[0]
        params = [r.sampling_params for r in requests]
        errors: dict[int, str] = {}
        want_logprobs = [p.logprobs is not None for p in params]
        raw_logprobs = None
        if any(want_logprobs):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        needs_min_tokens = any(len(r.output_token_ids) < r.sampling_params.min_tokens
                               for r in requests)
        needs_bias = any(getattr(p, "logit_bias", None) for p in params)
        if any(p.needs_penalties for p in params) or needs_min_tokens or needs_bias:
            # checked before penalties, which could hide a +inf behind the finite cap
            for i in unsampleable_rows(logits).nonzero()[:, 0].tolist():
                errors[i] = _NON_FINITE
            logits = logits.clone()
            for i in range(n):   # row by row, so that one row's failure stays its own
                if i in errors:
                    continue
                try:
                    one, row = logits[i:i + 1], requests[i:i + 1]
                    apply_min_tokens(apply_penalties(apply_logit_bias(one, row), row), row)
                except Exception as exc:  # noqa: BLE001 - fails this row only
                    errors[i] = f"penalties failed: {type(exc).__name__}: {exc}"

        if grammar_bitmask is not None and grammar_rows is not None:
            rows = [i for i, g in enumerate(grammar_rows) if g is not None and i not in errors]
            if rows:
                from tokenfactory.text.grammar import mask_logits
                sub = grammar_bitmask[torch.tensor([grammar_rows[i] for i in rows])]
                logits = mask_logits(logits, rows, sub)
        own = [i for i, r in enumerate(requests)
               if getattr(r, "grammar", None) is not None and i not in errors]
        if own:
            logits = self._apply_grammars(logits, requests, own, errors)

        best, tokens = logits.max(dim=-1)                                    # (N,) greedy
        # the same pass finds rows that cannot be sampled: max propagates NaN, is +inf when
        # any logit is, and -inf when every token is masked
        for i in (~torch.isfinite(best)).nonzero()[:, 0].tolist():
            errors.setdefault(i, _NOTHING_LEFT if best[i] == float("-inf") else _NON_FINITE)
        random_rows = [i for i, p in enumerate(params) if not p.greedy and i not in errors]
        if random_rows:
            try:
                tokens[torch.tensor(random_rows, device=logits.device)] = self._sample_rows(
                    logits, requests, random_rows)
            except Exception:  # noqa: BLE001 - isolate the culprit: one row at a time
                for i in random_rows:
                    try:
                        tokens[i] = self._sample_rows(logits, requests, [i])[0]
                    except Exception as exc:  # noqa: BLE001 - fails this row only
                        errors[i] = f"sampling failed: {type(exc).__name__}: {exc}"
        token_list: list[int | None] = tokens.tolist()

        logprobs: list[PositionLogprobs | None] = [None] * n
        if raw_logprobs is not None:
            rows = [i for i in range(n) if want_logprobs[i] and i not in errors]
            for num_top in sorted({params[i].logprobs for i in rows}):
                group = [i for i in rows if params[i].logprobs == num_top]
                gi = torch.tensor(group, device=logits.device)
                for i, entry in zip(group, position_logprobs(raw_logprobs[gi], tokens[gi],
                                                             num_top)):
                    logprobs[i] = entry
        for i, msg in errors.items():
            token_list[i] = None
            requests[i].sampling_error = msg
        return SamplerOutput(token_list, logprobs, errors)

    def _apply_grammars(self, logits: torch.Tensor, requests: list[Row], rows: list[int],
                        errors: dict[int, str]) -> torch.Tensor:
        """Mask each of ``rows`` (row objects carrying their own matcher as ``grammar``) to
        the tokens it allows next: one bitmask, filled per row, applied in one pass; a row
        whose matcher fails gets an entry in ``errors``. The engine instead fills the step
        plan's bitmask (``EngineCore._fill_grammar_masks``). logits: (N, V), in place."""
        from tokenfactory.text.grammar import allocate_bitmask, fill_bitmasks, mask_logits
        matchers = [requests[i].grammar for i in rows]
        bitmask = allocate_bitmask(len(rows), max(m.vocab_size for m in matchers))  # (G, W)
        for k, msg in fill_bitmasks(matchers, bitmask).items():
            errors[rows[k]] = f"structured output: {msg}"
        return mask_logits(logits, rows, bitmask)

    def _sample_rows(self, logits: torch.Tensor, requests: list[Row],
                     rows: list[int]) -> torch.Tensor:
        """Draw one token for each of ``rows`` (non-greedy, sampleable rows of ``logits``)."""
        params = [requests[i].sampling_params for i in rows]
        dev = logits.device
        idx = torch.tensor(rows, device=dev)
        temps = torch.tensor([p.temperature for p in params], device=dev)
        sub = logits[idx] / temps[:, None]                                   # (R, V)
        overflow = unsampleable_rows(sub)
        if bool(overflow.any()):
            # 1/T overflowed: the same distribution from logits shifted by the row maximum
            # (every value <= 0, so dividing cannot overflow to +inf)
            rows_of = logits[idx][overflow]
            sub[overflow] = ((rows_of - rows_of.max(dim=-1, keepdim=True).values)
                             / temps[overflow][:, None])
        sub = filter_logits(
            sub,
            torch.tensor([p.top_k for p in params], device=dev),
            torch.tensor([p.top_p for p in params], device=dev),
            torch.tensor([p.min_p for p in params], device=dev))
        probs = sub.softmax(dim=-1)                                          # (R, V)
        return self._draw(probs, [requests[i] for i in rows])

    def _draw(self, probs: torch.Tensor, requests: list[Row]) -> torch.Tensor:
        """One token per row from (R, V) probabilities."""
        out = torch.empty(probs.shape[0], dtype=torch.int64, device=probs.device)
        unseeded = [i for i, r in enumerate(requests) if r.sampling_params.seed is None]
        if unseeded:
            ui = torch.tensor(unseeded, device=probs.device)
            out[ui] = torch.multinomial(probs[ui], 1, generator=self.generator)[:, 0]
        for i, req in enumerate(requests):
            seed = req.sampling_params.seed
            if seed is None:
                continue
            gen = torch.Generator(probs.device)
            gen.manual_seed(derive_seed(seed, len(req.output_token_ids)))
            out[i] = torch.multinomial(probs[i], 1, generator=gen)[0]
        return out
