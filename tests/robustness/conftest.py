"""Fixtures and response checks for the robustness suite (issue 6). The live servers, the
scripted engine and the serve subprocess live in tests/live.py, shared with tests/api."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.live import (BLOCK_SIZE, HEADERS, MODEL_LEN, NUM_BLOCKS, REPLIES, WEATHER_TOOL,  # noqa: F401
                        FakeClock, LiveServer, RecordingScriptedExecutor, ServeProcess, free_port,
                        live_server, make_engine, parse_sse)


@pytest.fixture(scope="module")
def server(tokenizer):
    with live_server(tokenizer, min_cache_tokens=1024) as s:
        yield s


# --------------------------------------------------------------------------- responses
def check_anthropic_error(r, status: int, etype: str) -> str:
    """An Anthropic-format error with this status and type; returns its message."""
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == etype, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert r.headers["request-id"].startswith("req_")
    return body["error"]["message"]


def check_openai_error(r, status: int, etype: str) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == etype and set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    return err["message"]


def is_protocol_error(path: str, r) -> bool:
    """True when ``r`` is a 4xx in the format of the protocol ``path`` speaks."""
    return 400 <= r.status_code < 500 and is_error_body(path, r.content)


def is_error_body(path: str, content: bytes) -> bool:
    """True when ``content`` is an error body in the format of the protocol ``path`` speaks."""
    try:
        body = json.loads(content)
    except ValueError:
        return False
    if path.startswith(("/v1/chat/completions", "/v1/completions")):
        err = body.get("error") if isinstance(body, dict) else None
        return (isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}
                and isinstance(err["message"], str) and isinstance(err["type"], str))
    return (isinstance(body, dict) and body.get("type") == "error"
            and isinstance(body.get("error"), dict)
            and isinstance(body["error"].get("type"), str)
            and isinstance(body["error"].get("message"), str))


ANTHROPIC_STOP_REASONS = {"end_turn", "max_tokens", "stop_sequence", "tool_use",
                          "model_context_window_exceeded", "pause_turn", "refusal"}


def check_anthropic_stream(frames) -> dict:
    """A complete, well-formed Messages stream. Returns the final message_delta."""
    for event, data in frames:
        assert isinstance(data, dict) and event == data["type"], (event, data)
    names = [e for e, _ in frames if e != "ping"]
    assert "error" not in names, frames
    assert names[0] == "message_start", names
    assert names[-2:] == ["message_delta", "message_stop"], names
    start = next(d for e, d in frames if e == "message_start")["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["role"] == "assistant"
    open_index = None
    next_index = 0
    for event, data in frames:
        if event == "content_block_start":
            assert open_index is None and data["index"] == next_index, names
            open_index = data["index"]
            next_index += 1
        elif event == "content_block_delta":
            assert data["index"] == open_index, names
            kind = frames and data["delta"]["type"]
            assert kind in ("text_delta", "input_json_delta"), data
        elif event == "content_block_stop":
            assert data["index"] == open_index, names
            open_index = None
        elif event in ("message_delta", "message_stop"):
            assert open_index is None, names
    assert names.count("message_delta") == 1 and names.count("message_stop") == 1
    delta = next(d for e, d in frames if e == "message_delta")
    assert delta["delta"]["stop_reason"] in ANTHROPIC_STOP_REASONS, delta
    assert delta["usage"]["output_tokens"] >= 0
    return delta


def anthropic_stream_text(frames) -> str:
    return "".join(d["delta"].get("text", "") for e, d in frames if e == "content_block_delta")


def check_openai_stream(frames, *, include_usage: bool = False) -> dict:
    """A complete, well-formed chat.completion.chunk stream. Returns the finishing chunk."""
    assert frames and frames[-1] == (None, "[DONE]"), frames[-3:]
    chunks = [d for _, d in frames[:-1]]
    assert all(isinstance(c, dict) and "error" not in c for c in chunks), chunks
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    if include_usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 0
        chunks = chunks[:-1]
    finishing = [c for c in chunks if c["choices"][0]["finish_reason"] is not None]
    assert len(finishing) == 1 and finishing[0] is chunks[-1], chunks[-3:]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
    return chunks[-1]


def metric_value(text: str, name: str) -> float:
    """The value of an unlabelled sample in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def tokenizer_with_template(tokenizer, tmp_path: Path, template: str):
    """A copy of ``tokenizer`` (a directory on disk) whose chat template is ``template``."""
    import shutil

    from tokenfactory.text.tokenizer import Tokenizer
    target = tmp_path / "tok_with_template"
    shutil.copytree(tokenizer.name_or_path, target, dirs_exist_ok=True)
    (target / "chat_template.jinja").write_text(template, encoding="utf-8")
    return Tokenizer.from_dir(target)
