"""Every Anthropic request field either works or is a clear 400 (issue 19): thinking.display
"omitted", metadata, tool_result is_error, server tools, containers / MCP servers,
service_tier and speed. Official SDK where it can send the field."""
from __future__ import annotations

import anthropic
import pytest

from tests.live import WEATHER_TOOL

from .test_thinking import HI, THOUGHT, think_server  # noqa: F401 - the module fixture


@pytest.fixture
def client(server):
    return anthropic.Anthropic(base_url=server.base_url, api_key="x", max_retries=0)


def test_thinking_display_omitted_hides_the_text_and_comes_back(think_server):  # noqa: F811
    client = anthropic.Anthropic(base_url=think_server.base_url, api_key="x", max_retries=0)
    thinking = {"type": "adaptive", "display": "omitted"}
    msg = client.messages.create(model="tf-test", max_tokens=64, messages=HI,
                                 thinking=thinking)
    block = msg.content[0]
    assert block.type == "thinking" and block.thinking == "" and block.signature
    assert THOUGHT not in block.signature   # (carried, base64-encoded)
    kinds = []
    with client.messages.stream(model="tf-test", max_tokens=64, messages=HI,
                                thinking=thinking) as stream:
        kinds = [ev.delta.type for ev in stream if ev.type == "content_block_delta"]
    assert "thinking_delta" not in kinds and "signature_delta" in kinds
    # sent back, the omitted block stands for its full text: the same prompt as the shown one
    shown = client.messages.create(model="tf-test", max_tokens=64, messages=HI).content[0]

    def turn(b):
        return [*HI, {"role": "assistant", "content": [b.model_dump(), {"type": "text",
                                                                      "text": "Hello there!"}]},
                {"role": "user", "content": "More?"}]
    count = [client.messages.count_tokens(model="tf-test", messages=turn(b)).input_tokens
             for b in (block, shown)]
    bare = client.messages.count_tokens(model="tf-test", messages=[
        *HI, {"role": "assistant", "content": "Hello there!"},
        {"role": "user", "content": "More?"}]).input_tokens
    assert count[0] == count[1] > bare
    forged = block.model_copy(update={"signature": block.signature[:-6] + "AAAAA="})
    with pytest.raises(anthropic.BadRequestError, match="signature"):
        client.messages.count_tokens(model="tf-test", messages=turn(forged))
    redacted = {"type": "redacted_thinking", "data": "opaque"}
    with pytest.raises(anthropic.BadRequestError, match="redacted_thinking"):
        client.messages.count_tokens(model="tf-test", messages=[
            *HI, {"role": "assistant", "content": [redacted, {"type": "text", "text": "x"}]},
            {"role": "user", "content": "More?"}])
    with pytest.raises(anthropic.BadRequestError, match="display"):
        client.messages.create(model="tf-test", max_tokens=8, messages=HI,
                               thinking={"type": "adaptive", "display": "verbose"})
    think_server.assert_no_leaks()


def test_metadata_takes_only_user_id(client):
    ok = client.messages.create(model="tf-test", max_tokens=8, messages=HI,
                                metadata={"user_id": '{"device": "x"}'})
    assert ok.content
    with pytest.raises(anthropic.BadRequestError, match="metadata"):
        client.messages.create(model="tf-test", max_tokens=8, messages=HI,
                               extra_body={"metadata": {"user_id": "u", "team": "t"}})


def test_tool_result_is_error_reaches_the_model(client):
    def count(is_error):
        return client.messages.count_tokens(model="tf-test", tools=[WEATHER_TOOL], messages=[
            {"role": "user", "content": "w"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1",
                                               "name": "get_weather", "input": {"city": "x"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                          "content": "city not found", "is_error": is_error}]},
        ]).input_tokens
    assert count(True) > count(False)


@pytest.mark.parametrize("extra,needle", [
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tool"),
    ({"container": "container_123"}, "container"),
    ({"mcp_servers": [{"type": "url", "url": "http://127.0.0.1:9", "name": "m"}]},
     "mcp_servers"),
    ({"service_tier": "priority"}, "service_tier"),
    ({"speed": "fast"}, "speed"),
])
def test_fields_this_server_cannot_honour_are_400(client, server, extra, needle):
    with pytest.raises(anthropic.BadRequestError, match=needle):
        client.messages.create(model="tf-test", max_tokens=8, messages=HI, extra_body=extra)
    ok = client.messages.create(model="tf-test", max_tokens=8, messages=HI,
                                service_tier="auto", extra_body={"speed": "standard"})
    assert ok.content
    server.assert_no_leaks()
