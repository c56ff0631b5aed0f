"""Raw SSE, frame by frame, with httpx (what any client, not only the SDKs, receives)."""
from __future__ import annotations

import json
import time

import httpx

from tests.live import parse_sse

from .test_anthropic_sdk import WEATHER_TOOL

HEADERS = {"anthropic-version": "2023-06-01", "content-type": "application/json"}


def read_frames(resp) -> list[tuple[str | None, dict | str]]:
    return parse_sse("\n".join(resp.iter_lines()) + "\n")


def stream_messages(server, body, **kw):
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", server.base_url + "/v1/messages", json={**body, "stream": True},
                           headers=HEADERS, **kw) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            return read_frames(resp)


def test_text_stream_frames(server):
    frames = stream_messages(server, {"model": "tf-test", "max_tokens": 64, "messages": [
        {"role": "user", "content": "hi [[reply:hello]]"}]})
    for event, data in frames:
        assert event == data["type"]
    names = [e for e, _ in frames if e != "ping"]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert names[1] == "content_block_start" and names[-3] == "content_block_stop"
    assert set(names[2:-3]) == {"content_block_delta"}
    start = frames[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["role"] == "assistant"
    assert start["id"].startswith("msg_")
    for key in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
                "cache_creation", "output_tokens"):
        assert key in start["usage"]
    blocks = [d for e, d in frames if e == "content_block_start"]
    assert blocks == [{"type": "content_block_start", "index": 0,
                       "content_block": {"type": "text", "text": ""}}]
    deltas = [d["delta"] for e, d in frames if e == "content_block_delta"]
    assert all(d["type"] == "text_delta" for d in deltas)
    assert "".join(d["text"] for d in deltas) == "Hello! I am a scripted model."
    delta = [d for e, d in frames if e == "message_delta"][0]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] > 0
    server.assert_no_leaks()


def test_tool_use_stream_frames(server):
    frames = stream_messages(server, {"model": "tf-test", "max_tokens": 128, "tools": [WEATHER_TOOL],
                                      "messages": [{"role": "user", "content": "w [[reply:tool]]"}]})
    seq = [(e, d.get("index"), (d.get("delta") or d.get("content_block") or {}).get("type"))
           for e, d in frames if e != "ping"]
    assert seq[0][0] == "message_start"
    assert seq[1] == ("content_block_start", 0, "text")
    i = seq.index(("content_block_stop", 0, None))
    assert all(s == ("content_block_delta", 0, "text_delta") for s in seq[2:i])
    assert seq[i + 1] == ("content_block_start", 1, "tool_use")
    j = seq.index(("content_block_stop", 1, None))
    assert j > i + 2 and all(s == ("content_block_delta", 1, "input_json_delta")
                             for s in seq[i + 2:j])
    assert [s[0] for s in seq[j + 1:]] == ["message_delta", "message_stop"]
    tool_start = [d for e, d in frames if e == "content_block_start"][1]["content_block"]
    assert tool_start["type"] == "tool_use" and tool_start["input"] == {}
    assert tool_start["id"].startswith("toolu_") and tool_start["name"] == "get_weather"
    partial = "".join(d["delta"]["partial_json"] for e, d in frames
                      if e == "content_block_delta" and d["index"] == 1)
    assert json.loads(partial) == {"city": "Paris", "unit": "celsius"}
    assert [d for e, d in frames if e == "message_delta"][0]["delta"]["stop_reason"] == "tool_use"


def test_pings_are_sent_while_waiting(server):
    frames = stream_messages(server, {"model": "tf-test", "max_tokens": 4, "messages": [
        {"role": "user", "content": "slowly [[slow]] [[reply:long]]"}]})
    assert any(e == "ping" for e, _ in frames)
    assert frames[-1][0] == "message_stop"
    assert [d for e, d in frames if e == "message_delta"][0]["delta"]["stop_reason"] == "max_tokens"


def test_a_ping_follows_message_start_and_nothing_comes_before_it(server):
    """As the API streams: message_start first, then a ping; while the request waits for its
    first output (each step of a [[slow]] request takes 80 ms, the ping interval is 50 ms) the
    connection is kept alive by SSE comments, which are not events."""
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", server.base_url + "/v1/messages", headers=HEADERS, json={
                "model": "tf-test", "max_tokens": 2, "stream": True,
                "messages": [{"role": "user", "content": "[[slow]] [[reply:hello]]"}]}) as resp:
            raw = "".join(resp.iter_text())
    assert raw.startswith(": keepalive\n\n")           # waited, without an event
    frames = parse_sse(raw)
    assert [e for e, _ in frames[:2]] == ["message_start", "ping"]
    assert frames[-1][0] == "message_stop"


def test_openai_stream_frames(server):
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", server.base_url + "/v1/chat/completions", json={
                "model": "tf-test", "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": "hi [[reply:hello]]"}]}) as resp:
            frames = read_frames(resp)
    assert frames[-1] == (None, "[DONE]")
    chunks = [d for _, d in frames[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])


def test_client_disconnect_aborts_and_frees_pages(server):
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", server.base_url + "/v1/messages", headers=HEADERS, json={
                "model": "tf-test", "max_tokens": 300, "stream": True,
                "messages": [{"role": "user", "content": "[[slow]] [[reply:long]]"}]}) as resp:
            n = 0
            for line in resp.iter_lines():
                if line.startswith("event: content_block_delta"):
                    n += 1
                    if n == 3:
                        break
    deadline = time.monotonic() + 10
    while server.core.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not server.core.has_unfinished_requests(), "the request was not aborted"
    server.assert_no_leaks()


def test_non_streaming_client_that_leaves_aborts_its_request(server):
    try:
        httpx.post(server.base_url + "/v1/messages", headers=HEADERS, timeout=0.4, json={
            "model": "tf-test", "max_tokens": 300,
            "messages": [{"role": "user", "content": "[[slow]] [[reply:long]]"}]})
        raise AssertionError("expected a client timeout")
    except httpx.TimeoutException:
        pass
    deadline = time.monotonic() + 10
    while server.core.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not server.core.has_unfinished_requests(), "the request was not aborted"
    server.assert_no_leaks()


def test_keepalive_retrieves_an_error_that_lands_as_the_client_leaves():
    """The frame source fails while the client is gone (between a ping and the next read):
    closing the stream must not leave an unretrieved task exception for asyncio to log
    ("Task exception was never retrieved", once per request in a disconnect storm)."""
    import asyncio
    import gc

    from tokenfactory.api.sse import with_keepalive

    async def frames():
        await asyncio.sleep(0.05)
        raise RuntimeError("the source failed")
        yield "never"   # noqa: unreachable - makes this an async generator

    async def go() -> list:
        reported = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: reported.append(ctx))
        stream = with_keepalive(frames(), 0.01, "ping")
        assert await stream.__anext__() == "ping"
        await asyncio.sleep(0.2)          # the source fails meanwhile; nobody is reading
        await stream.aclose()             # the client left
        del stream
        gc.collect()
        await asyncio.sleep(0)
        return reported
    reported = asyncio.run(go())
    assert not [c for c in reported if "never retrieved" in c.get("message", "")], reported
