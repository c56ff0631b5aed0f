"""OpenAI-compatible /v1/completions: raw prompts (strings or token ids, one or several) with
no chat template, ``n`` choices each, ``echo`` and ``logprobs``.

Several prompts give ``n`` choices each, numbered ``prompt_index * n + j`` (as OpenAI and vLLM
number them); usage is summed over the prompts.
"""
from __future__ import annotations

import time
from typing import Any, AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request

from tokenfactory.api.errors import APIError
from tokenfactory.api.openai_choices import (ended_stream, finish_reason, merged_events,
                                             start_choices, summed_cost_headers, usage_of)
from tokenfactory.api.openai_logprobs import CompletionLogprobs, join_logprobs
from tokenfactory.api.openai_models import MAX_CHOICES, CompletionRequest
from tokenfactory.api.openai_sampling import (choice_params, max_tokens_headers,
                                              sampling_params, utf8_len)
from tokenfactory.api.serving import (Finished, Generation, GenerationFailed, ServingContext,
                                      Started, TextEvent)
from tokenfactory.api.sse import (OPENAI_KEEPALIVE, SSE_HEADERS, collect_unless_disconnected,
                                  openai_frame, with_keepalive)
from tokenfactory.api.trace import trace_of



def _prompt_list(prompt) -> list[str | list[int]]:
    """The completions API's ``prompt`` as a list of prompts: a string, a list of strings, a
    list of token ids (one prompt) or a list of token-id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], (str, list)):
        return list(prompt)
    return [prompt]


def _check_prompts(ctx: ServingContext, prompts: list[str | list[int]]) -> None:
    """Cheap rejections before tokenizing: each prompt's size (its bytes, or its token count
    when given as ids) and its ids in the vocabulary."""
    many = len(prompts) > 1
    for i, prompt in enumerate(prompts):
        where = f"prompt[{i}]" if many else "prompt"
        if isinstance(prompt, str):
            ctx.check_prompt_bytes(utf8_len(prompt), param="prompt")
        elif not prompt:
            raise APIError(400, f"{where} is empty", param="prompt")
        elif len(prompt) >= ctx.context_limit:
            ctx.effective_max_tokens(len(prompt), 1)   # the "prompt is too long" 400
    vocab = getattr(ctx.tokenizer, "vocab_size", None)
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, list) and vocab and any(not 0 <= t < vocab for t in prompt):
            where = f"prompt[{i}]" if many else "prompt"
            raise APIError(400, f"{where}: token ids must be in [0, {vocab})", param="prompt")


async def _prompt_ids(ctx: ServingContext, prompts: list[str | list[int]]) -> list[list[int]]:
    """Each prompt's token ids, strings tokenized off the event loop in one go."""
    many = len(prompts) > 1
    texts = [p for p in prompts if isinstance(p, str)]
    encoded = iter(await ctx.off_loop(
        lambda: [ctx.encode(t, add_special_tokens=True) for t in texts]) if texts else [])
    out = [next(encoded) if isinstance(p, str) else list(p) for p in prompts]
    for i, ids in enumerate(out):
        if not ids:
            raise APIError(400, f"prompt[{i}] is empty" if many else "the prompt is empty",
                           param="prompt")
    return out


async def create_completion(ctx: ServingContext, request: Request, body: CompletionRequest,
                            tenant: str | None):
    trace = trace_of(request)   # None unless tracing is installed (api/trace.py)
    ctx.resolve_model(body.model)
    prompts = _prompt_list(body.prompt)
    n = body.n or 1
    if len(prompts) * n > MAX_CHOICES:
        raise APIError(400, f"{len(prompts)} prompts x n={n} is more than {MAX_CHOICES} "
                            "choices per request", param="prompt")
    _check_prompts(ctx, prompts)
    ctx.check_capacity(tenant, 429)
    all_ids = await _prompt_ids(ctx, prompts)
    if trace is not None:
        trace.mark_tokenized(sum(map(len, all_ids)))
    requested = body.max_tokens or 16   # the completions API's documented default
    k = body.logprobs
    jobs, limits = [], []
    for ids in all_ids:
        params, max_tokens, clamped = sampling_params(ctx, body, len(ids), requested,
                                                      logprobs=k,
                                                      prompt_logprobs=k if body.echo else None)
        jobs += [(ids, p) for p in choice_params(params, n)]
        limits.append((max_tokens, clamped))
    cid = ctx.new_request_id("cmpl-")
    gens = await start_choices(ctx, cid, jobs, tenant, trace, n=n)
    headers = max_tokens_headers(min(m for m, _ in limits), any(c for _, c in limits),
                                 requested)
    created = int(time.time())
    echoes = [((p if isinstance(p, str) else ctx.tokenizer.decode(ids)) if body.echo else "")
              for p, ids in zip(prompts, all_ids) for _ in range(n)]   # one per choice
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        frames = _completion_stream(ctx, gens, body.model, cid, created, echoes, include_usage,
                                    k, n)
        return StreamingResponse(with_keepalive(frames, ctx.options.ping_interval, OPENAI_KEEPALIVE),
                                 media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
    result = await collect_unless_disconnected(
        request, _completion_collect(ctx, gens, body, cid, created, echoes, k, n))
    return JSONResponse(result, headers={**headers, **summed_cost_headers(gens)})


async def _completion_collect(ctx: ServingContext, gens: list[Generation],
                              body: CompletionRequest, cid: str, created: int,
                              echoes: list[str], k: int | None, n: int) -> dict:
    parts: list[list[str]] = [[echo] for echo in echoes]
    finals: list[Any] = [None] * len(gens)
    try:
        async for i, ev in merged_events(gens):
            if isinstance(ev, TextEvent):
                parts[i].append(ev.text)
            elif isinstance(ev, Finished):
                finals[i] = ev.output
    except GenerationFailed as exc:
        raise APIError(500, f"generation failed: {exc}") from None
    choices = []
    for i, final in enumerate(finals):
        logprobs = None
        if k is not None:
            lp = CompletionLogprobs(ctx, k)
            logprobs = join_logprobs(
                lp.build(final.prompt_token_ids, final.prompt_logprobs or [])
                if body.echo else None,
                lp.build(final.outputs[0].token_ids, final.outputs[0].logprobs or []))
        choices.append({"index": i, "text": "".join(parts[i]), "logprobs": logprobs,
                        "finish_reason": finish_reason(final, 0)})
    return {"id": cid, "object": "text_completion", "created": created, "model": body.model,
            "choices": choices, "usage": usage_of(finals, n)}


def _completion_stream(ctx, gens: list[Generation], model: str, cid: str, created: int,
                       echoes: list[str], include_usage: bool, k: int | None,
                       n: int) -> AsyncIterator[str]:
    """``text_completion`` frames as the choices' events arrive, then ``[DONE]``."""
    return ended_stream(_completion_chunks(ctx, gens, model, cid, created, echoes,
                                           include_usage, k, n), cid)


async def _completion_chunks(ctx, gens: list[Generation], model: str, cid: str,
                             created: int, echoes: list[str], include_usage: bool,
                             k: int | None, n: int) -> AsyncIterator[str]:
    lps = [CompletionLogprobs(ctx, k) if k is not None else None for _ in gens]
    sent = [0] * len(gens)
    finals: list[Any] = [None] * len(gens)

    def chunk(i: int, text: str, finish: str | None = None, out=None,
              prompt: bool = False) -> str:
        logprobs = None
        if lps[i] is not None and out is not None:
            if prompt:
                logprobs = lps[i].build(out.prompt_token_ids, out.prompt_logprobs or [])
            else:
                comp = out.outputs[0]
                end = len(comp.logprobs or ())
                logprobs = lps[i].build(comp.token_ids[sent[i]:end], comp.logprobs[sent[i]:end])
                sent[i] = end
        return openai_frame({"id": cid, "object": "text_completion", "created": created,
                             "model": model, "choices": [{"index": i, "text": text,
                                                          "logprobs": logprobs,
                                                          "finish_reason": finish}]})
    async for i, ev in merged_events(gens):
        if isinstance(ev, Started) and echoes[i]:
            yield chunk(i, echoes[i], out=ev.output, prompt=True)
        elif isinstance(ev, TextEvent):
            yield chunk(i, ev.text, out=gens[i].last_output)
        elif isinstance(ev, Finished):
            finals[i] = ev.output
            yield chunk(i, "", finish_reason(ev.output, 0), ev.output)
            if include_usage and all(f is not None for f in finals):
                yield openai_frame({"id": cid, "object": "text_completion",
                                    "created": created, "model": model, "choices": [],
                                    "usage": usage_of(finals, n)})
