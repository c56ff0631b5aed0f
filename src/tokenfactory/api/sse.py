"""Response plumbing both protocols share: server-sent events framing, keepalive pings, and
waiting for a result while watching for a client that leaves.

It sits below the route modules (openai.py, anthropic.py) and server.py, which import it, so none
of them needs to import another."""
from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
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


# How many frames the puller may hold ahead of the response writer. Frames one engine output
# produces together (an Anthropic message_start, ping, content_block_start and first delta)
# fit, so they leave as one write; a slow client holds the generation back after that many,
# and its outputs merge upstream (serving.Generation) as before.
MAX_AHEAD = 16


class _FrameSlot:
    """Frames pulled by the stream's puller task, waiting for the response writer."""

    __slots__ = ("loop", "frames", "end", "error", "reader", "writer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.frames: deque[str] = deque()
        self.end = False                      # the source is exhausted (or failed: error)
        self.error: BaseException | None = None
        self.reader: asyncio.Future | None = None   # the writer waits here for frames
        self.writer: asyncio.Future | None = None   # the puller waits here for room

    @staticmethod
    def _wake(fut: asyncio.Future | None, value: bool = True) -> None:
        if fut is not None and not fut.done():
            fut.set_result(value)

    def put(self, frame: str) -> None:
        self.frames.append(frame)
        self._wake(self.reader)

    def finish(self, error: BaseException | None = None) -> None:
        self.end, self.error = True, error
        self._wake(self.reader)

    def take_all(self) -> str:
        """Every frame waiting, as one string (one write to the client); room for the puller."""
        frames = self.frames
        text = frames.popleft() if len(frames) == 1 else "".join(frames)
        frames.clear()
        self._wake(self.writer)
        return text

    async def room(self) -> None:
        while len(self.frames) >= MAX_AHEAD:
            self.writer = self.loop.create_future()
            try:
                await self.writer
            finally:
                self.writer = None

    async def wait(self, timeout: float) -> bool:
        """Until a frame or the end arrives (True) or ``timeout`` seconds pass (False)."""
        fut = self.reader = self.loop.create_future()
        timer = self.loop.call_later(timeout, self._wake, fut, False)
        try:
            return await fut
        finally:
            timer.cancel()
            self.reader = None


async def _pull(frames: AsyncIterator[str], slot: _FrameSlot) -> None:
    it = frames.__aiter__()
    try:
        while True:
            await slot.room()
            slot.put(await it.__anext__())
    except StopAsyncIteration:
        slot.finish()
    except asyncio.CancelledError as exc:
        # ours (the writer left) or the source's own: either way the writer must not end the
        # response as if the stream were complete
        slot.finish(exc)
        raise
    except BaseException as exc:  # noqa: BLE001 - raised to the response writer
        slot.finish(exc)


async def with_keepalive(frames: AsyncIterator[str], interval: float, ping: str,
                         before_first: str | None = None) -> AsyncIterator[str]:
    """Yield ``frames``, inserting ``ping`` whenever nothing was sent for ``interval`` seconds;
    until the first frame has gone out, ``before_first`` instead when given (the Anthropic
    stream: no event may precede ``message_start``, so an SSE comment keeps the connection
    alive while the request waits for the engine).

    One puller task per stream runs ``frames`` (at most ``MAX_AHEAD`` frames ahead of what
    was sent); frames that are ready together are joined into one chunk, so one engine
    output is one write however many SSE events it makes. A ping never interrupts the source
    (only the client leaving cancels it), so the underlying generation is not disturbed.
    Not a task and an ``asyncio.wait`` per frame: each cost three event-loop hand-offs per
    frame on the way from the engine to the socket.
    """
    loop = asyncio.get_running_loop()
    slot = _FrameSlot(loop)
    puller = loop.create_task(_pull(frames, slot))
    first = True
    try:
        while True:
            if slot.frames:
                first = False
                yield slot.take_all()
                continue
            if slot.end:
                if slot.error is not None:
                    exc, slot.error = slot.error, None
                    raise exc
                return
            if not await slot.wait(interval):
                yield before_first if before_first is not None and first else ping
    finally:
        if not puller.done():
            puller.cancel()
        with contextlib.suppress(BaseException):
            await puller
        with contextlib.suppress(BaseException):
            await frames.aclose()


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
