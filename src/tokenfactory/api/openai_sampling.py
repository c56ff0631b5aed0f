"""OpenAI request fields -> the engine's SamplingParams, shared by chat completions and
completions: server defaults, stop sequences and token ids checked, ``logit_bias`` keyed by
token id, one seed per choice, and the max_tokens the request is served with."""
from __future__ import annotations

import dataclasses
from typing import Any

from tokenfactory.api.errors import APIError
from tokenfactory.api.serving import ServingContext, make_sampling_params


def utf8_len(text: str) -> int:
    """UTF-8 bytes of ``text`` (what ``ServingContext.check_prompt_bytes`` counts)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def sampling_params(ctx: ServingContext, body, num_prompt: int, requested: int | None,
                    structured_output=None, *, logprobs: int | None = None,
                    prompt_logprobs: int | None = None):
    """(SamplingParams, the max_tokens served, whether it was clamped below ``requested``)
    for a prompt of ``num_prompt`` tokens; ``body`` is a chat or completions request."""
    max_tokens, clamped = ctx.effective_max_tokens(num_prompt, requested)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > ctx.options.max_stop_sequences:
        raise APIError(400, f"stop: at most {ctx.options.max_stop_sequences} sequences",
                       param="stop")
    vocab = getattr(ctx.tokenizer, "vocab_size", None)
    if vocab and any(not 0 <= t < vocab for t in body.stop_token_ids or ()):
        raise APIError(400, f"stop_token_ids must be token ids in [0, {vocab})",
                       param="stop_token_ids")
    kw: dict[str, Any] = dict(
        max_tokens=max_tokens, stop=stop, seed=body.seed,
        temperature=ctx.sampling_default("temperature", body.temperature, 1.0),
        top_p=ctx.sampling_default("top_p", body.top_p, 1.0),
        top_k=ctx.sampling_default("top_k", body.top_k, 0) or 0,
        min_p=ctx.sampling_default("min_p", body.min_p, 0.0),
        presence_penalty=ctx.sampling_default("presence_penalty", body.presence_penalty, 0.0),
        frequency_penalty=ctx.sampling_default("frequency_penalty", body.frequency_penalty, 0.0),
        repetition_penalty=ctx.sampling_default("repetition_penalty", body.repetition_penalty,
                                                1.0),
        ignore_eos=bool(body.ignore_eos),
        min_tokens=body.min_tokens or 0, stop_token_ids=body.stop_token_ids or [],
        structured_output=structured_output, logit_bias=_logit_bias(body.logit_bias, vocab),
        logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    return make_sampling_params(**kw), max_tokens, clamped


def _logit_bias(bias: dict[str, float] | None, vocab: int | None) -> dict[int, float] | None:
    """OpenAI's ``{"token id": bias}`` (JSON keys are strings) as {id: bias}, ids checked
    against the vocabulary (bounds on the values: SamplingParams)."""
    if not bias:
        return None
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            tid = int(key)
        except ValueError:
            raise APIError(400, f"logit_bias keys must be token ids, got {key[:40]!r}",
                           param="logit_bias") from None
        if not 0 <= tid < (vocab or 2**31):
            raise APIError(400, f"logit_bias: token id {tid} is not in [0, {vocab})",
                           param="logit_bias")
        out[tid] = value
    return out


def _choice_seeds(seed: int | None, n: int) -> list[int | None]:
    """One seed per choice: choice i of a seeded request uses ``seed + i`` (kept in the 64-bit
    range), so each choice is reproducible and no two are the same sample."""
    if seed is None:
        return [None] * n
    return [seed] + [(seed + i + 2**63) % 2**64 - 2**63 for i in range(1, n)]


def choice_params(params, n: int) -> list:
    """The SamplingParams of each of ``n`` choices (they differ only in the seed)."""
    return [params] + [dataclasses.replace(params, seed=s)
                       for s in _choice_seeds(params.seed, n)[1:]]


def max_tokens_headers(max_tokens: int, clamped: bool, requested) -> dict:
    """``x-tokenfactory-max-tokens`` (the limit served), and the clamp when there was one."""
    h = {"x-tokenfactory-max-tokens": str(max_tokens)}
    if clamped:
        h["x-tokenfactory-max-tokens-clamped"] = f"{requested}->{max_tokens}"
    return h
