"""Mistral and Qwen3-Coder tool calls through the official SDKs: the parser is chosen from the
served chat template, calls come back as tool_use blocks / tool_calls, streamed argument
fragments concatenate to the final arguments; OpenAI's ``parallel_tool_calls: false`` admits
one call (the Anthropic flag's test is in test_anthropic_sdk.py). The scripted model writes
the replies; tokenizer, scheduler, grammar and KV pages are real. Forced and strict
Qwen3-Coder calls run on a random-weight model (the demo checkpoint): whatever it writes,
the grammar makes it a call of the right tool with arguments valid for the schema."""
from __future__ import annotations

import json

import anthropic
import jsonschema
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
    """The grammar ends the reply after the first call (Mistral's and Qwen3-Coder's own call
    formats). Both APIs."""
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


# ------------------------------------------------ Qwen3-Coder calls forced by grammar
# Values a random model cannot ramble in (raw string values are free text; the text tests in
# tests/text/test_tool_formats.py hold those to the format)
UNITS = {"type": "object", "properties": {
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 9},
    "hourly": {"type": "boolean"}},
    "required": ["unit", "days"], "additionalProperties": False}
CLOCK = {"type": "object", "properties": {"zone": {"const": "UTC"}}, "required": ["zone"]}


@pytest.fixture(scope="module")
def qwen_model(tmp_path_factory):
    from tokenfactory.engine.async_engine import AsyncEngine
    from tokenfactory.engine.llm import build_engine_core
    from tokenfactory.model.demo import ensure_demo_checkpoint

    path = with_template(ensure_demo_checkpoint(), tmp_path_factory.mktemp("qwen3_coder"),
                         QWEN3_CODER)
    core = build_engine_core(path, dtype="float32", compile=False, max_model_len=1024,
                             kv_cache_memory=8 << 20)
    with live_server(core.tokenizer, engine=AsyncEngine(core), served_model_name="q",
                     random_weights=True) as srv:
        assert srv.app.state.ctx.parser_name == "qwen3_coder"
        yield srv


def _oai_tools(strict: bool = False):
    return [{"type": "function", "function": {"name": "weather", "parameters": UNITS,
                                              "strict": strict}},
            {"type": "function", "function": {"name": "clock", "parameters": CLOCK}}]


@pytest.mark.parametrize("choice, names", [
    ("required", {"weather", "clock"}),
    ({"type": "function", "function": {"name": "weather"}}, {"weather"}),
    ({"type": "function", "function": {"name": "clock"}}, {"clock"}),
])
def test_openai_forced_qwen3_coder_call_is_valid(qwen_model, choice, names):
    client = openai.OpenAI(base_url=qwen_model.base_url + "/v1", api_key="x", max_retries=0)
    kw = dict(model="q", tools=_oai_tools(), tool_choice=choice, max_tokens=300, seed=1,
              messages=[{"role": "user", "content": "Weather in Oslo?"}])
    r = client.chat.completions.create(**kw)
    choice0 = r.choices[0]
    assert choice0.finish_reason == "tool_calls" and not choice0.message.content
    [call] = choice0.message.tool_calls
    assert call.function.name in names
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, UNITS if call.function.name == "weather" else CLOCK)
    # streamed: the argument fragments concatenate to the same call
    frags, name = "", None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            name = tc.function.name or name
            frags += tc.function.arguments or ""
    assert (name, json.loads(frags)) == (call.function.name, args)
    qwen_model.assert_no_leaks()


def test_openai_strict_qwen3_coder_tool_in_auto_mode(qwen_model):
    """strict in auto mode: the reply is text or calls, and every call fits its schema."""
    client = openai.OpenAI(base_url=qwen_model.base_url + "/v1", api_key="x", max_retries=0)
    for seed in range(3):
        r = client.chat.completions.create(
            model="q", tools=_oai_tools(strict=True), max_tokens=60, seed=seed,
            messages=[{"role": "user", "content": "Weather in Oslo?"}])
        for call in r.choices[0].message.tool_calls or []:
            jsonschema.validate(json.loads(call.function.arguments),
                                UNITS if call.function.name == "weather" else CLOCK)
        assert "<tool_call>" not in (r.choices[0].message.content or "")
    qwen_model.assert_no_leaks()


def test_openai_strict_qwen3_coder_keyword_it_cannot_hold_is_400(qwen_model):
    client = openai.OpenAI(base_url=qwen_model.base_url + "/v1", api_key="x", max_retries=0)
    tool = {"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"code": {"type": "string", "pattern": "^a+$"}}}}}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="q", tools=[tool], max_tokens=5,
                                       messages=[{"role": "user", "content": "x"}])
    assert "pattern cannot be enforced" in str(err.value)
    qwen_model.assert_no_leaks()


@pytest.mark.parametrize("choice, names", [
    ({"type": "any"}, {"weather", "clock"}),
    ({"type": "tool", "name": "clock"}, {"clock"}),
])
def test_anthropic_forced_qwen3_coder_call_is_valid(qwen_model, choice, names):
    client = anthropic.Anthropic(base_url=qwen_model.base_url, api_key="x", max_retries=0)
    tools = [{"name": "weather", "description": "", "input_schema": UNITS},
             {"name": "clock", "description": "", "input_schema": CLOCK}]
    kw = dict(model="q", max_tokens=300, tools=tools, tool_choice=choice,
              messages=[{"role": "user", "content": "Weather in Oslo?"}])
    msg = client.messages.create(**kw)
    assert msg.stop_reason == "tool_use"
    [block] = [b for b in msg.content if b.type == "tool_use"]
    assert block.name in names
    jsonschema.validate(block.input, UNITS if block.name == "weather" else CLOCK)
    partial = ""
    with client.messages.stream(**kw) as stream:
        for ev in stream:
            if ev.type == "content_block_delta" and ev.delta.type == "input_json_delta":
                partial += ev.delta.partial_json
        final = stream.get_final_message()
    [streamed] = [b for b in final.content if b.type == "tool_use"]
    assert json.loads(partial) == streamed.input
    qwen_model.assert_no_leaks()
