"""Mistral and Qwen3-Coder tool calls through the official SDKs: the parser is chosen from the
served chat template, calls come back as tool_use blocks / tool_calls, streamed argument
fragments concatenate to the final arguments; OpenAI's ``parallel_tool_calls: false`` admits
one call (the Anthropic flag's test is in test_anthropic_sdk.py). The scripted model writes
the replies; tokenizer, scheduler, grammar and KV pages are real."""
from __future__ import annotations

import json

import anthropic
import openai
import pytest

from tests.live import live_server, make_engine

from .test_thinking_budget import with_template

MISTRAL = (
    "{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{%- endif %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}[INST]{{ m.content }}[/INST]"
    "{%- elif m.role == 'tool' %}[TOOL_RESULTS]{{ m.content }}[/TOOL_RESULTS]"
    "{%- elif m.role == 'assistant' %}{{ m.content }}{%- for c in m.tool_calls or [] %}"
    "[TOOL_CALLS]{{ c.function.name }}[ARGS]{{ c.function.arguments | tojson }}{%- endfor %}"
    "<|im_end|>{%- endif %}{%- endfor %}")
QWEN3_CODER = (
    "{%- if tools %}<|im_start|>system\n<tools>{% for t in tools %}\n{{ t | tojson }}"
    "{% endfor %}\n</tools>\nCall a function as <tool_call>\n<function=NAME>\n<parameter=KEY>"
    "\nVALUE\n</parameter>\n</function>\n</tool_call><|im_end|>\n{%- endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")
WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "input_schema": {"type": "object", "properties": {
               "city": {"type": "string"}, "days": {"type": "integer"}},
               "required": ["city"]}}
REPLIES = {
    "mistral": 'Checking.[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo", "days": 2}'
               '[TOOL_CALLS]get_weather[ARGS]{"city": "Bergen \\"west\\"", "days": 1}',
    "qwen3_coder": "Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n"
                   "</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>"
                   "\n<tool_call>\n<function=get_weather>\n<parameter=city>\nBergen \"west\"\n"
                   "</parameter>\n<parameter=days>\n1\n</parameter>\n</function>\n</tool_call>",
}
EXPECTED = {"mistral": [{"city": "Oslo", "days": 2}, {"city": 'Bergen "west"', "days": 1}],
            "qwen3_coder": [{"city": "Oslo", "days": 2}, {"city": 'Bergen "west"', "days": 1}]}


@pytest.fixture(scope="module", params=["mistral", "qwen3_coder"])
def fmt_server(request, demo_tokenizer_dir, tmp_path_factory):
    from tokenfactory.text.tokenizer import Tokenizer
    template = MISTRAL if request.param == "mistral" else QWEN3_CODER
    tok = Tokenizer.from_dir(with_template(demo_tokenizer_dir,
                                           tmp_path_factory.mktemp(request.param), template))
    reply = tok.encode(REPLIES[request.param]) + [min(tok.eos_token_ids)]
    with live_server(tok, engine=make_engine(tok, script=lambda state: reply)) as srv:
        srv.fmt = request.param
        yield srv


def test_the_template_picks_the_parser(fmt_server):
    expected = {"mistral": "mistral_args", "qwen3_coder": "qwen3_coder"}[fmt_server.fmt]
    assert fmt_server.app.state.ctx.parser_name == expected


def test_anthropic_tool_use_streamed_and_not(fmt_server):
    client = anthropic.Anthropic(base_url=fmt_server.base_url, api_key="x", max_retries=0)
    kw = dict(model="tf-test", max_tokens=200, tools=[WEATHER],
              messages=[{"role": "user", "content": "Weather in Oslo?"}])
    msg = client.messages.create(**kw)
    assert [b.type for b in msg.content] == ["text"] + ["tool_use"] * len(EXPECTED[fmt_server.fmt])
    assert msg.content[0].text == "Checking."
    assert [b.input for b in msg.content[1:]] == EXPECTED[fmt_server.fmt]
    assert msg.stop_reason == "tool_use"
    partial: dict[int, str] = {}
    with client.messages.stream(**kw) as stream:
        for ev in stream:
            if ev.type == "content_block_delta" and ev.delta.type == "input_json_delta":
                partial[ev.index] = partial.get(ev.index, "") + ev.delta.partial_json
        final = stream.get_final_message()
    assert [json.loads(partial[i]) for i in sorted(partial)] == EXPECTED[fmt_server.fmt]
    assert [b.input for b in final.content[1:]] == EXPECTED[fmt_server.fmt]
    fmt_server.assert_no_leaks()


def test_openai_tool_calls_streamed(fmt_server):
    client = openai.OpenAI(base_url=fmt_server.base_url + "/v1", api_key="x", max_retries=0)
    tool = {"type": "function", "function": {"name": WEATHER["name"],
                                             "parameters": WEATHER["input_schema"]}}
    calls: dict[int, str] = {}
    content = ""
    for chunk in client.chat.completions.create(model="tf-test", tools=[tool], stream=True,
                                                messages=[{"role": "user", "content": "w"}]):
        delta = chunk.choices[0].delta if chunk.choices else None
        content += (delta.content or "") if delta else ""
        for tc in (delta.tool_calls or []) if delta else []:
            calls[tc.index] = calls.get(tc.index, "") + (tc.function.arguments or "")
    assert content == "Checking."
    # each call's argument deltas concatenate to JSON of exactly its arguments
    assert [json.loads(calls[i]) for i in sorted(calls)] == EXPECTED[fmt_server.fmt]
    fmt_server.assert_no_leaks()


def test_parallel_calls_off_admit_one_call_in_both_formats(fmt_server):
    """Mistral: the grammar ends the reply after the first call; Qwen3-Coder (no grammar):
    the parser passes the first call only. Both APIs."""
    first = EXPECTED[fmt_server.fmt][:1]
    client = anthropic.Anthropic(base_url=fmt_server.base_url, api_key="x", max_retries=0)
    msg = client.messages.create(model="tf-test", max_tokens=200, tools=[WEATHER],
                                 tool_choice={"type": "auto", "disable_parallel_tool_use": True},
                                 messages=[{"role": "user", "content": "w"}])
    assert [b.input for b in msg.content if b.type == "tool_use"] == first
    assert msg.stop_reason == "tool_use"
    oai = openai.OpenAI(base_url=fmt_server.base_url + "/v1", api_key="x", max_retries=0)
    tool = {"type": "function", "function": {"name": WEATHER["name"],
                                             "parameters": WEATHER["input_schema"]}}
    r = oai.chat.completions.create(model="tf-test", tools=[tool], parallel_tool_calls=False,
                                    messages=[{"role": "user", "content": "w"}])
    assert [json.loads(c.function.arguments) for c in r.choices[0].message.tool_calls] == first
    fmt_server.assert_no_leaks()


def test_openai_parallel_tool_calls_false_admits_one_call(server, openai_client):
    """On the Hermes demo template: the grammar ends the reply after the first call, so the
    scripted model's second call is never generated; by default both come back."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}},
             {"type": "function", "function": {"name": "get_time", "parameters": {
                 "type": "object"}}}]
    kw = dict(model="tf-test", tools=tools,
              messages=[{"role": "user", "content": "[[reply:two_tools]]"}])
    one = openai_client.chat.completions.create(parallel_tool_calls=False, **kw)
    assert [c.function.name for c in one.choices[0].message.tool_calls] == ["get_weather"]
    assert one.choices[0].finish_reason == "tool_calls"
    both = openai_client.chat.completions.create(**kw)
    assert [c.function.name for c in both.choices[0].message.tool_calls] == ["get_weather",
                                                                          "get_time"]
    server.assert_no_leaks()
