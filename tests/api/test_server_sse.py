"""sse.with_keepalive on its own (no server): frames that are ready together leave as one
write, a slow client holds the source back, pings fill silences, errors and departures reach
the right side."""
from __future__ import annotations

import asyncio

import pytest

from tokenfactory.api import sse


async def _collect(stream) -> list[str]:
    return [chunk async for chunk in stream]


def test_frames_ready_together_leave_as_one_chunk_in_order():
    async def frames():
        for name in ("message_start", "ping", "content_block_start", "delta"):
            yield f"event: {name}\n\n"

    chunks = asyncio.run(_collect(sse.with_keepalive(frames(), 10.0, "PING")))
    assert chunks == ["event: message_start\n\nevent: ping\n\nevent: content_block_start\n\n"
                      "event: delta\n\n"]


def test_frames_that_arrive_apart_leave_apart():
    async def frames():
        for i in range(3):
            await asyncio.sleep(0.01)
            yield f"data: {i}\n\n"

    chunks = asyncio.run(_collect(sse.with_keepalive(frames(), 10.0, "PING")))
    assert chunks == ["data: 0\n\n", "data: 1\n\n", "data: 2\n\n"]


def test_a_slow_client_holds_the_source_back():
    """The source runs at most MAX_AHEAD frames ahead of what was sent: a client that stops
    reading leaves the generation's outputs to merge upstream instead of piling up here."""
    pulled = 0

    async def frames():
        nonlocal pulled
        while True:
            pulled += 1
            yield "data: x\n\n"
            await asyncio.sleep(0)

    async def go() -> int:
        stream = sse.with_keepalive(frames(), 10.0, "PING")
        await stream.__anext__()
        await asyncio.sleep(0.1)          # the client reads nothing for a while
        seen = pulled
        await stream.aclose()
        return seen

    assert asyncio.run(go()) <= 2 * sse.MAX_AHEAD + 1


def test_pings_fill_silences_and_the_first_one_can_differ():
    async def frames():
        await asyncio.sleep(0.08)
        yield "data: 1\n\n"
        await asyncio.sleep(0.08)
        yield "data: 2\n\n"

    chunks = asyncio.run(_collect(sse.with_keepalive(frames(), 0.02, "PING", before_first=": c\n\n")))
    first = chunks.index("data: 1\n\n")
    assert first >= 1 and set(chunks[:first]) == {": c\n\n"}
    between = chunks[first + 1:chunks.index("data: 2\n\n")]
    assert between and set(between) == {"PING"}


def test_an_error_in_the_source_follows_the_frames_before_it():
    async def frames():
        yield "data: 1\n\n"
        await asyncio.sleep(0.01)
        raise RuntimeError("the source failed")

    async def go() -> list[str]:
        got = []
        with pytest.raises(RuntimeError, match="the source failed"):
            async for chunk in sse.with_keepalive(frames(), 10.0, "PING"):
                got.append(chunk)
        return got

    assert asyncio.run(go()) == ["data: 1\n\n"]


def test_a_client_that_leaves_stops_the_source():
    finished = asyncio.Event

    async def go() -> tuple[bool, bool]:
        closed = finished()

        async def frames():
            try:
                yield "data: 1\n\n"
                await asyncio.sleep(30)    # waiting for the engine when the client leaves
                yield "data: 2\n\n"
            finally:
                closed.set()

        stream = sse.with_keepalive(frames(), 10.0, "PING")
        assert await stream.__anext__() == "data: 1\n\n"
        task = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.01)
        task.cancel()                       # the response task is cancelled
        with pytest.raises(asyncio.CancelledError):
            await task
        await stream.aclose()
        return closed.is_set(), not [t for t in asyncio.all_tasks()
                                     if t is not asyncio.current_task()]

    source_closed, no_tasks_left = asyncio.run(go())
    assert source_closed and no_tasks_left


def test_a_source_cancelled_on_its_own_does_not_end_the_stream_as_complete():
    async def frames():
        yield "data: 1\n\n"
        await asyncio.sleep(0.01)
        raise asyncio.CancelledError   # e.g. its generation was cancelled elsewhere

    async def go() -> list[str]:
        got = []
        stream = sse.with_keepalive(frames(), 10.0, "PING")
        with pytest.raises(asyncio.CancelledError):
            async for chunk in stream:
                got.append(chunk)
        return got

    assert asyncio.run(go()) == ["data: 1\n\n"]
