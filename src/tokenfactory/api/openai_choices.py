"""The ``n`` choices of an OpenAI request (chat or completions) as engine requests: started so
that they share their prompt's KV pages, their events merged into one stream, and one usage,
finish reason and bill for them all."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator

from tokenfactory.api.errors import APIError, openai_error_body
from tokenfactory.api.serving import Generation, GenerationFailed, ServingContext, cost_headers
from tokenfactory.api.sse import openai_frame

log = logging.getLogger("tokenfactory.api")


async def start_choices(ctx: ServingContext, cid: str, jobs: list[tuple[list[int], Any]],
                        tenant: str | None, trace, parser=None, *,
                        n: int = 1) -> list[Generation]:
    """Submit one engine request per (prompt ids, params) job (each with its own tool parser);
    jobs come in groups of ``n`` choices of one prompt. If one cannot start, those already
    submitted are aborted.

    The n choices of a prompt share its KV pages: the engine's prefix cache only knows a
    page once it is computed, so choices admitted together would each prefill the prompt.
    The first choice of each prompt goes first; the others are submitted once its first
    output arrived (its prompt pages are then cached) and read those pages from cache."""
    slots: list[Generation | None] = [None] * len(jobs)

    async def submit(i: int) -> None:
        ids, params = jobs[i]
        slots[i] = Generation(ctx, cid if i == 0 else f"{cid}-{i}", ids, params,
                                     cache_salt=tenant, breakpoints=[], overload_status=429,
                                     trace=trace if i == 0 else None,
                                     parser=parser() if parser is not None else None)
        await slots[i].start()

    share = n > 1 and ctx.prefix_caching
    try:
        for i in range(len(jobs)):
            if not share or i % n == 0:
                await submit(i)
        if share:
            await asyncio.gather(*(slots[i].prefilled() for i in range(0, len(jobs), n)
                                   if len(jobs[i][0]) >= ctx.block_size))
            for i in range(len(jobs)):
                if i % n:
                    await submit(i)
    except BaseException:
        for gen in slots:
            if gen is not None:
                await gen.close()
        raise
    gens: list[Generation] = slots   # type: ignore[assignment] - every slot is filled
    return gens


_DONE = object()


async def merged_events(gens: list[Generation]) -> AsyncIterator[tuple[int, Any]]:
    """(choice index, event) from every generation as they arrive; one choice's failure ends
    the whole stream (the others are aborted)."""
    if len(gens) == 1:
        async for ev in gens[0].events():
            yield 0, ev
        return
    # bounded: a slow reader holds each choice back at its put, so the outputs pile up merged
    # in that choice's Generation (one pending output each), not as events here
    queue: asyncio.Queue = asyncio.Queue(maxsize=len(gens))

    async def run(i: int, gen: Generation) -> None:
        try:
            async for ev in gen.events():
                await queue.put((i, ev))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - re-raised by the consumer
            await queue.put((i, exc))
            return
        await queue.put((i, _DONE))

    tasks = [asyncio.ensure_future(run(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(gens)
        while remaining:
            i, ev = await queue.get()
            if ev is _DONE:
                remaining -= 1
            elif isinstance(ev, BaseException):
                raise ev
            else:
                yield i, ev
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t


def usage_of(outs, n: int | None = None) -> dict:
    """One usage for all choices: each prompt counted once (with the cached tokens of its
    first choice), completion tokens summed (as OpenAI reports ``n`` > 1 and several
    prompts). ``outs`` come in groups of ``n`` choices per prompt (default: one prompt)."""
    outs = outs if isinstance(outs, list) else [outs]
    firsts = outs[::n or len(outs)]
    p = sum(len(o.prompt_token_ids) for o in firsts)
    c = sum(max(o.num_cached_tokens, 0) for o in firsts)
    done = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"prompt_tokens": p, "completion_tokens": done, "total_tokens": p + done,
            "prompt_tokens_details": {"cached_tokens": c}}


def finish_reason(out, num_tool_calls: int) -> str:
    comp = out.outputs[0]
    if comp.finish_reason == "length":
        return "length"
    if num_tool_calls and not isinstance(comp.stop_reason, str):
        return "tool_calls"
    return "stop"


def summed_cost_headers(gens: list[Generation]) -> dict[str, str]:
    """The bill of all choices: each header's figures summed over the choices."""
    heads = [cost_headers(g) for g in gens]
    if len(heads) == 1 or not heads[0]:
        return heads[0]
    out = {}
    for name in heads[0]:
        try:
            out[name] = f"{sum(float(h[name]) for h in heads):.6g}"
        except (KeyError, ValueError):
            out[name] = heads[0][name]
    return out


async def ended_stream(frames: AsyncIterator[str], cid: str) -> AsyncIterator[str]:
    """An OpenAI stream's ``frames`` (chat or completions chunks), then ``[DONE]``; a failure
    part-way ends it with an error frame first, never a cut connection."""
    try:
        async with contextlib.aclosing(frames):
            async for frame in frames:
                yield frame
    except APIError as exc:
        yield openai_frame(openai_error_body(exc.status, exc.message))
    except GenerationFailed as exc:
        yield openai_frame(openai_error_body(500, f"generation failed: {exc}"))
    except Exception as exc:  # noqa: BLE001 - never a cut stream without an error event
        log.exception("stream %s failed", cid)
        yield openai_frame(openai_error_body(500, f"internal error: {type(exc).__name__}"))
    yield openai_frame("[DONE]")
