"""One streamed request against an Anthropic- or OpenAI-compatible server, timed per chunk."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from tokenfactory.bench.workloads import Session


@dataclass
class RequestRecord:
    """What the load generator saw of one request. Times are seconds on the run's clock."""
    session: str
    turn: int
    t_send: float
    t_first: float | None = None        # first output text chunk
    t_end: float | None = None
    chunk_times: list[float] = field(default_factory=list)   # arrival of every output chunk
    prompt_tokens: int = 0              # total prompt tokens (cached included)
    cached_tokens: int = 0              # prompt tokens served from the prefix cache
    output_tokens: int = 0
    ok: bool = False
    error: str | None = None
    text: str = ""


def neutral_messages(session: Session, turn_index: int, replies: list[str]) -> list[dict]:
    """The conversation for turn `turn_index`: [{role, content}] with plain-text contents."""
    messages: list[dict] = []
    for k in range(turn_index + 1):
        turn = session.turns[k]
        if k > 0:
            reply = replies[k - 1] if session.reply == "model" else (turn.assistant or replies[k - 1])
            messages.append({"role": "assistant", "content": reply or "(no answer)"})
        messages.append({"role": "user", "content": turn.user})
    return messages


def anthropic_body(model: str, session: Session, messages: list[dict], max_tokens: int) -> dict:
    """Messages body with cache breakpoints on the last tool, the system prompt and the last turn."""
    msgs = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]
    msgs[-1]["content"][-1]["cache_control"] = {"type": "ephemeral"}
    body: dict[str, Any] = {
        "model": model, "max_tokens": max_tokens, "stream": True, "temperature": 0.0,
        "system": [{"type": "text", "text": session.system, "cache_control": {"type": "ephemeral"}}],
        "messages": msgs, "ignore_eos": True, "min_tokens": max_tokens,
    }
    if session.tools:
        tools = [{"name": t["name"], "description": t["description"], "input_schema": t["parameters"]}
                 for t in session.tools]
        tools[-1]["cache_control"] = {"type": "ephemeral"}
        body["tools"] = tools
    return body


def openai_body(model: str, session: Session, messages: list[dict], max_tokens: int) -> dict:
    body: dict[str, Any] = {
        "model": model, "max_tokens": max_tokens, "stream": True, "temperature": 0.0,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "system", "content": session.system}] + messages,
        "ignore_eos": True, "min_tokens": max_tokens,
    }
    if session.tools:
        body["tools"] = [{"type": "function", "function": t} for t in session.tools]
    return body


async def sse_events(response: httpx.Response):
    """Yield (event_name, data_str) for every SSE frame of a streamed response."""
    event, data = None, []
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = None, []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    if data:
        yield event, "\n".join(data)


async def send(client: httpx.AsyncClient, base_url: str, api: str, body: dict, rec: RequestRecord,
               clock) -> None:
    """POST `body` with stream=true and fill `rec` (times from `clock()`)."""
    path = "/v1/messages" if api == "anthropic" else "/v1/chat/completions"
    headers = {"anthropic-version": "2023-06-01", "x-api-key": "bench"} if api == "anthropic" \
        else {"authorization": "Bearer bench"}
    parts: list[str] = []
    try:
        async with client.stream("POST", base_url.rstrip("/") + path, json=body, headers=headers) as r:
            if r.status_code != 200:
                detail = (await r.aread()).decode("utf-8", "replace")[:300]
                rec.error = f"HTTP {r.status_code}: {detail}"
                return
            async for event, data in sse_events(r):
                if data == "[DONE]":
                    break
                now = clock()
                try:
                    obj = json.loads(data)
                except json.JSONDecodeError:
                    continue
                text = (_anthropic_chunk if api == "anthropic" else _openai_chunk)(obj, rec)
                if text:
                    if rec.t_first is None:
                        rec.t_first = now
                    rec.chunk_times.append(now)
                    parts.append(text)
        rec.t_end = clock()
        rec.text = "".join(parts)
        if rec.error is None:
            rec.ok = rec.t_first is not None
            if not rec.ok:
                rec.error = "no output text in the stream"
    except (httpx.HTTPError, OSError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"


def _anthropic_chunk(obj: dict, rec: RequestRecord) -> str:
    kind = obj.get("type")
    if kind == "message_start":
        u = obj.get("message", {}).get("usage", {}) or {}
        read = int(u.get("cache_read_input_tokens") or 0)
        rec.prompt_tokens = int(u.get("input_tokens") or 0) + int(u.get("cache_creation_input_tokens") or 0) + read
        rec.cached_tokens = read
        rec.output_tokens = int(u.get("output_tokens") or 0)
    elif kind == "content_block_delta":
        d = obj.get("delta", {})
        return d.get("text") or d.get("partial_json") or d.get("thinking") or ""
    elif kind == "message_delta":
        u = obj.get("usage", {}) or {}
        rec.output_tokens = int(u.get("output_tokens") or rec.output_tokens)
        for key in ("input_tokens", "cache_read_input_tokens"):   # some servers report here only
            if key in u and not rec.prompt_tokens:
                read = int(u.get("cache_read_input_tokens") or 0)
                rec.prompt_tokens = int(u.get("input_tokens") or 0) + int(
                    u.get("cache_creation_input_tokens") or 0) + read
                rec.cached_tokens = read
    elif kind == "error":
        rec.error = json.dumps(obj.get("error", obj))[:300]
    return ""


def _openai_chunk(obj: dict, rec: RequestRecord) -> str:
    if "error" in obj:
        rec.error = json.dumps(obj["error"])[:300]
        return ""
    u = obj.get("usage")
    if u:
        rec.prompt_tokens = int(u.get("prompt_tokens") or 0)
        rec.output_tokens = int(u.get("completion_tokens") or 0)
        details = u.get("prompt_tokens_details") or {}
        rec.cached_tokens = int(details.get("cached_tokens") or 0)
    timings = obj.get("timings")                  # llama.cpp's server: cache_n reused, prompt_n new
    if timings and not rec.cached_tokens and timings.get("cache_n") is not None:
        rec.cached_tokens = int(timings.get("cache_n") or 0)
        if not rec.prompt_tokens:
            rec.prompt_tokens = rec.cached_tokens + int(timings.get("prompt_n") or 0)
    text = ""
    for choice in obj.get("choices") or []:
        delta = choice.get("delta") or {}
        text += delta.get("content") or delta.get("reasoning_content") or ""
        for call in delta.get("tool_calls") or []:
            fn = call.get("function") or {}
            text += (fn.get("name") or "") + (fn.get("arguments") or "")
    return text
