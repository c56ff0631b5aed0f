"""The official anthropic SDK against a live server."""
from __future__ import annotations

import asyncio

import anthropic
import pytest

WEATHER_TOOL = {"name": "get_weather", "description": "Current weather for a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"},
                                                                  "unit": {"type": "string"}},
                                 "required": ["city"]}}


def test_create_text(anthropic_client, server):
    msg = anthropic_client.messages.create(
        model="tf-test", max_tokens=64, messages=[{"role": "user", "content": "Hi [[reply:hello]]"}])
    assert msg.type == "message" and msg.role == "assistant"
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == "Hello! I am a scripted model."
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    u = msg.usage
    assert u.output_tokens > 0
    total = u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens
    count = anthropic_client.messages.count_tokens(
        model="tf-test", messages=[{"role": "user", "content": "Hi [[reply:hello]]"}])
    assert count.input_tokens == total
    server.assert_no_leaks()


def test_create_async(server):
    async def go():
        client = anthropic.AsyncAnthropic(base_url=server.base_url, api_key="x", max_retries=0)
        msgs = await asyncio.gather(*[client.messages.create(
            model="tf-test", max_tokens=32,
            messages=[{"role": "user", "content": f"q{i} [[reply:hello]]"}]) for i in range(4)])
        await client.close()
        return msgs
    msgs = asyncio.run(go())
    assert all(m.content[0].text == "Hello! I am a scripted model." for m in msgs)
    server.assert_no_leaks()


def test_stream_get_final_message(anthropic_client, server):
    with anthropic_client.messages.stream(
            model="tf-test", max_tokens=64,
            messages=[{"role": "user", "content": "Hi [[reply:hello]]"}]) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(texts) == "Hello! I am a scripted model."
    assert final.content[0].text == "Hello! I am a scripted model."
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 0
    server.assert_no_leaks()


def test_tool_use_round_trip(anthropic_client, server):
    messages = [{"role": "user", "content": "Weather in Paris? [[reply:tool]]"}]
    first = anthropic_client.messages.create(model="tf-test", max_tokens=128, tools=[WEATHER_TOOL],
                                             messages=messages)
    assert first.stop_reason == "tool_use"
    assert [b.type for b in first.content] == ["text", "tool_use"]
    assert first.content[0].text == "Let me check the weather."
    call = first.content[1]
    assert call.id.startswith("toolu_") and call.name == "get_weather"
    assert call.input == {"city": "Paris", "unit": "celsius"}
    messages += [{"role": "assistant", "content": first.content},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                               "content": "sunny, 21C [[reply:final]]"}]}]
    second = anthropic_client.messages.create(model="tf-test", max_tokens=128,
                                              tools=[WEATHER_TOOL], messages=messages)
    assert second.stop_reason == "end_turn"
    assert second.content[0].text == "It is sunny in Paris, 21 degrees."
    server.assert_no_leaks()


def test_tool_use_streamed(anthropic_client, server):
    with anthropic_client.messages.stream(
            model="tf-test", max_tokens=128, tools=[WEATHER_TOOL],
            messages=[{"role": "user", "content": "Two calls [[reply:two_tools]]"}]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["tool_use", "tool_use"]
    assert final.content[0].input == {"city": "Oslo"}
    assert final.content[1].name == "get_time" and final.content[1].input == {"tz": "CET"}
    server.assert_no_leaks()


def test_malformed_tool_json_is_text(anthropic_client, server):
    msg = anthropic_client.messages.create(
        model="tf-test", max_tokens=128, tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": "x [[reply:bad_tool]]"}])
    assert msg.stop_reason == "end_turn"
    assert [b.type for b in msg.content] == ["text"]
    assert "{city: Paris}" in msg.content[0].text
    server.assert_no_leaks()


def test_stop_sequence(anthropic_client, server):
    msg = anthropic_client.messages.create(
        model="tf-test", max_tokens=64, stop_sequences=["STOP"],
        messages=[{"role": "user", "content": "count [[reply:stop]]"}])
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == "STOP"
    assert msg.content[0].text == "one two "
    server.assert_no_leaks()


def test_max_tokens(anthropic_client, server):
    msg = anthropic_client.messages.create(
        model="tf-test", max_tokens=5, messages=[{"role": "user", "content": "go [[reply:long]]"}])
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 5
    server.assert_no_leaks()


def test_tool_choice_tool_and_any_are_enforced(anthropic_client, server):
    """A forced call is constrained by a grammar: a well-formed call passes through it (its
    input streams in fragments), anything else fails the request (the scripted model ignores
    the mask, so the engine's grammar check is what stops it; the real model cannot even
    produce it: test_real_model.py)."""
    for choice in ({"type": "tool", "name": "get_weather"}, {"type": "any"}):
        msg = anthropic_client.messages.create(
            model="tf-test", max_tokens=64, tools=[WEATHER_TOOL], tool_choice=choice,
            messages=[{"role": "user", "content": "Oslo [[reply:tool_only]]"}])
        assert msg.stop_reason == "tool_use"
        assert msg.content[-1].name == "get_weather" and msg.content[-1].input == {"city": "Oslo"}
        with pytest.raises(anthropic.InternalServerError) as err:
            anthropic_client.messages.create(
                model="tf-test", max_tokens=64, tools=[WEATHER_TOOL], tool_choice=choice,
                messages=[{"role": "user", "content": "[[reply:hello]]"}])
        assert "grammar" in str(err.value)
    server.assert_no_leaks()


def test_tool_choice_none_returns_text(anthropic_client, server):
    msg = anthropic_client.messages.create(
        model="tf-test", max_tokens=128, tools=[WEATHER_TOOL], tool_choice={"type": "none"},
        messages=[{"role": "user", "content": "x [[reply:tool_only]]"}])
    assert msg.stop_reason == "end_turn" and msg.content[0].type == "text"
    assert "<tool_call>" in msg.content[0].text


def test_prefill_is_continued(anthropic_client, server):
    msg = anthropic_client.messages.create(
        model="tf-test", max_tokens=32,
        messages=[{"role": "user", "content": "finish it [[reply:continue]]"},
                  {"role": "assistant", "content": "This is the start"}])
    assert msg.content[0].text == " and that is the end."


def test_system_blocks_and_merged_turns(anthropic_client, server):
    msg = anthropic_client.messages.create(
        model="tf-test", max_tokens=32,
        system=[{"type": "text", "text": "You are terse."}, {"type": "text", "text": "Be kind."}],
        messages=[{"role": "user", "content": "one"},
                  {"role": "user", "content": [{"type": "text", "text": "two [[reply:hello]]"}]}])
    assert msg.content[0].text == "Hello! I am a scripted model."


def test_stream_with_pings_before_and_during(anthropic_client, server):
    # 80 ms per step and a 50 ms ping interval: pings arrive before message_start too
    with anthropic_client.messages.stream(
            model="tf-test", max_tokens=3,
            messages=[{"role": "user", "content": "[[slow]] [[reply:long]]"}]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 3


@pytest.mark.parametrize("thinking, fragment", [
    ({"type": "enabled", "budget_tokens": 512}, "greater than or equal to 1024"),
    ({"type": "enabled", "budget_tokens": 4096}, "`max_tokens` must be greater than"),
    ({"type": "enabled"}, "budget_tokens"),
    ({"type": "sometimes"}, "thinking.type"),
])
def test_bad_thinking_config_is_a_400(anthropic_client, thinking, fragment):
    with pytest.raises(anthropic.BadRequestError) as err:
        anthropic_client.messages.create(
            model="tf-test", max_tokens=2048, thinking=thinking,
            messages=[{"role": "user", "content": "[[reply:hello]]"}])
    assert fragment in str(err.value)


def test_thinking_without_a_reasoning_template_is_answered_without_thinking(anthropic_client,
                                                                          server):
    """The model has no reasoning section (its template shows none): a valid thinking config
    is accepted (Claude Code always sends one) and the answer has no thinking blocks."""
    for thinking in ({"type": "enabled", "budget_tokens": 1024}, {"type": "adaptive"},
                     {"type": "disabled"}):
        msg = anthropic_client.messages.create(
            model="tf-test", max_tokens=2048, thinking=thinking,
            messages=[{"role": "user", "content": "[[reply:hello]]"}])
        assert [b.type for b in msg.content] == ["text"]
    server.assert_no_leaks()


def test_disable_parallel_tool_use_is_enforced(anthropic_client, server):
    """The grammar admits one call and then ends the reply: the scripted model's second call
    is never generated. Without the flag (unconstrained) both calls come back."""
    tc = {"type": "auto", "disable_parallel_tool_use": True}
    kw = dict(model="tf-test", max_tokens=128, tools=[WEATHER_TOOL, {
        "name": "get_time", "input_schema": {"type": "object"}}], tool_choice=tc)
    msg = anthropic_client.messages.create(
        messages=[{"role": "user", "content": "[[reply:two_tools]]"}], **kw)
    assert [b.name for b in msg.content] == ["get_weather"] and msg.stop_reason == "tool_use"
    assert msg.content[0].input == {"city": "Oslo"}
    tc["disable_parallel_tool_use"] = False
    msg = anthropic_client.messages.create(
        messages=[{"role": "user", "content": "[[reply:two_tools]]"}], **kw)
    assert [b.name for b in msg.content] == ["get_weather", "get_time"]
    server.assert_no_leaks()
