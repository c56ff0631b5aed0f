"""Response plumbing both protocols share: server-sent events framing, keepalive pings, and
waiting for a result while watching for a client that leaves.

It sits below the route modules (openai.py, anthropic.py) and server.py, which import it, so none
of them needs to import another."""
from __future__ import annotations

import asyncio
import contextlib
import json
from typing import AsyncIterator

from starlette.requests import Request

from tokenfactory.api.errors import APIError


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def anthropic_frame(data: dict) -> str:
    """``event: NAME`` + ``data: JSON``; the JSON's ``type`` is the event name."""
    return f"event: {data['type']}\ndata: {dumps(data)}\n\n"


def openai_frame(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else dumps(data)}\n\n"


ANTHROPIC_PING = anthropic_frame({"type": "ping"})
SSE_COMMENT = ": keepalive\n\n"   # an SSE comment: every client ignores it (not an event)
OPENAI_KEEPALIVE = SSE_COMMENT
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


async def with_keepalive(frames: AsyncIterator[str], interval: float, ping: str,
                         before_first: str | None = None) -> AsyncIterator[str]:
    """Yield ``frames``, inserting ``ping`` whenever nothing was sent for ``interval`` seconds;
    until the first frame has gone out, ``before_first`` instead when given (the Anthropic
    stream: no event may precede ``message_start``, so an SSE comment keeps the connection
    alive while the request waits for the engine).

    The pending ``__anext__`` is never cancelled by a ping (only by the client leaving), so the
    underlying generation is not disturbed.
    """
    it = frames.__aiter__()
    pending: asyncio.Future | None = None
    first = True
    try:
        while True:
            pending = asyncio.ensure_future(it.__anext__())
            while True:
                done, _ = await asyncio.wait({pending}, timeout=interval)
                if done:
                    break
                yield before_first if before_first is not None and first else ping
            try:
                frame = pending.result()
            except StopAsyncIteration:
                pending = None
                return
            pending = None
            first = False
            yield frame
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        elif pending is not None and not pending.cancelled():
            # finished (with a frame or an error) just as the client left: retrieve the
            # outcome, else asyncio logs "Task exception was never retrieved" for each one
            pending.exception()
        with contextlib.suppress(BaseException):
            await it.aclose()


async def collect_unless_disconnected(request: Request, coro, poll_seconds: float = 0.25):
    """Await ``coro``; if the client goes away first, cancel it (which aborts the engine
    request)."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_seconds)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise APIError(400, "client disconnected")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        elif not task.cancelled():
            task.exception()   # finished while we checked for a disconnect: mark it retrieved
                               # (else asyncio logs "Task exception was never retrieved")
