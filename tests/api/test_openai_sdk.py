"""The official openai SDK against a live server."""
from __future__ import annotations

import json

import openai
import pytest

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def test_chat_non_stream(openai_client, server):
    r = openai_client.chat.completions.create(
        model="tf-test", max_tokens=32, messages=[{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "hi [[reply:hello]]"}])
    assert r.object == "chat.completion"
    assert r.choices[0].message.content == "Hello! I am a scripted model."
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    server.assert_no_leaks()


def test_chat_stream_include_usage(openai_client, server):
    stream = openai_client.chat.completions.create(
        model="tf-test", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "hi [[reply:hello]]"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello! I am a scripted model."
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_prefix_cache_reported_as_cached_tokens(openai_client):
    messages = [{"role": "system", "content": "You answer questions. " * 40},
                {"role": "user", "content": "hi [[reply:hello]]"}]
    first = openai_client.chat.completions.create(model="tf-test", messages=messages, max_tokens=4)
    second = openai_client.chat.completions.create(model="tf-test", messages=messages, max_tokens=4)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached == ((first.usage.prompt_tokens - 1) // 16) * 16 > 0


def test_chat_tools(openai_client, server):
    r = openai_client.chat.completions.create(
        model="tf-test", tools=[WEATHER], messages=[{"role": "user", "content": "w [[reply:tool]]"}])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check the weather."
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    # round trip: the tool result goes back as a tool message
    r2 = openai_client.chat.completions.create(model="tf-test", tools=[WEATHER], messages=[
        {"role": "user", "content": "w"}, choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny [[reply:final]]"}])
    assert r2.choices[0].message.content == "It is sunny in Paris, 21 degrees."
    server.assert_no_leaks()


def test_chat_tools_stream(openai_client):
    stream = openai_client.chat.completions.create(
        model="tf-test", tools=[WEATHER], stream=True,
        messages=[{"role": "user", "content": "w [[reply:two_tools]]"}])
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        for tc in d.tool_calls or []:
            entry = calls.setdefault(tc.index, {"name": "", "args": "", "id": None})
            entry["id"] = entry["id"] or tc.id
            entry["name"] += (tc.function.name or "") if tc.function else ""
            entry["args"] += (tc.function.arguments or "") if tc.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [calls[i]["name"] for i in sorted(calls)] == ["get_weather", "get_time"]
    assert json.loads(calls[1]["args"]) == {"tz": "CET"}
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_tool_choice_required_and_named(openai_client, server):
    """Forced calls are grammar-constrained (see the Anthropic twin of this test)."""
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = openai_client.chat.completions.create(
            model="tf-test", tools=[WEATHER], tool_choice=choice,
            messages=[{"role": "user", "content": "[[reply:tool_only]]"}])
        assert r.choices[0].finish_reason == "tool_calls"
        assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"city": "Oslo"}
        with pytest.raises(openai.InternalServerError) as err:
            openai_client.chat.completions.create(
                model="tf-test", tools=[WEATHER], tool_choice=choice,
                messages=[{"role": "user", "content": "[[reply:hello]]"}])
        assert "grammar" in str(err.value)
    server.assert_no_leaks()


def test_completions(openai_client, server):
    r = openai_client.completions.create(model="tf-test", prompt="Say it [[reply:stop]]",
                                         max_tokens=32, stop=["STOP"])
    assert r.choices[0].text == "one two " and r.choices[0].finish_reason == "stop"
    chunks = list(openai_client.completions.create(model="tf-test", prompt="x [[reply:long]]",
                                                   max_tokens=6, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks).startswith("word0 wor")
    server.assert_no_leaks()


def test_models_lists_served_name_and_aliases(openai_client, server):
    ids = [m.id for m in openai_client.models.list().data]
    assert ids == ["tf-test", "claude-*"]
    import anthropic
    a = anthropic.Anthropic(base_url=server.base_url, api_key="x", max_retries=0)
    assert [m.id for m in a.models.list().data] == ["tf-test", "claude-*"]


def test_n_choices_stream_abandoned_or_failed_frees_every_request(openai_client, server):
    """n > 1 is n engine requests: a client leaving mid-stream aborts all of them, and one
    choice failing mid-generation fails the response and aborts the others."""
    import time

    import httpx
    body = {"model": "tf-test", "n": 3, "stream": True, "max_tokens": 200,
            "messages": [{"role": "user", "content": "[[slow]] [[reply:long]]"}]}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", server.base_url + "/v1/chat/completions", json=body) as r:
            seen = set()
            for line in r.iter_lines():
                if line.startswith("data:") and '"content":"' in line and '"content":""' not in line:
                    seen.add(json.loads(line[5:])["choices"][0]["index"])
                    if len(seen) == 3:
                        break   # every choice is generating: leave
    deadline = time.monotonic() + 10   # a hang guard: the abort is immediate
    while server.core.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not server.core.has_unfinished_requests(), "the choices were not aborted"
    server.assert_no_leaks()
    with pytest.raises(openai.InternalServerError):
        openai_client.chat.completions.create(
            model="tf-test", n=2, max_tokens=50,
            messages=[{"role": "user", "content": "[[fail_after:3]] [[reply:long]]"}])
    server.assert_no_leaks()
