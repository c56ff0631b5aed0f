"""The default model behind the API: SmolLM2-135M-Instruct from its GGUF file, real weights.

What a newcomer sees after `make serve`: English answers through both official SDKs, sampling
defaults from the model card where a request leaves them out, and a visible note when the chat
template cannot show the request's tools to the model.
"""
from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from tests.live import WEATHER_TOOL, live_server

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def real_server():
    from tokenfactory.api.serve_cli import generation_defaults
    from tokenfactory.engine.async_engine import AsyncEngine
    from tokenfactory.engine.llm import build_engine_core
    from tokenfactory.model.default import default_model_path

    path = default_model_path()
    # float32: greedy text then does not depend on batch composition or prefix-cache state
    # (in bf16 "The" and "L" are 0.08 apart after this prompt, and a cached prefix can flip
    # them; tests/model/test_gguf.py checks the bf16 default on a fresh prompt).
    core = build_engine_core(path, dtype="float32", max_model_len=2048,
                             kv_cache_memory=64 << 20)
    defaults = generation_defaults(core.tokenizer, str(path))
    with live_server(core.tokenizer, engine=AsyncEngine(core), served_model_name="smollm2",
                     sampling_defaults=defaults) as srv:
        yield srv


def test_anthropic_sdk_streams_an_english_answer(real_server):
    client = anthropic.Anthropic(base_url=real_server.base_url, api_key="x", max_retries=0)
    with client.messages.stream(model="smollm2", max_tokens=24, messages=CAPITAL,
                                extra_body={"temperature": 0.0}) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert "Paris" in text
    assert final.content[0].text == text and final.usage.output_tokens <= 24
    real_server.assert_no_leaks()


def test_openai_sdk_answers_in_english(real_server):
    client = openai.OpenAI(base_url=real_server.base_url + "/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(model="smollm2", max_tokens=24, temperature=0,
                                       messages=CAPITAL)
    assert "Paris" in r.choices[0].message.content
    real_server.assert_no_leaks()


def test_model_card_reports_the_sampling_defaults(real_server):
    card = httpx.get(real_server.base_url + "/v1/models").json()["data"][0]
    assert card["sampling_defaults"] == {"temperature": 0.2, "top_p": 0.9}
    assert card["random_weights"] is False
    assert card["chat_template_shows_tools"] is False   # SmolLM2's template has no tool section


def test_omitted_sampling_uses_the_model_defaults(tokenizer):
    """A scripted engine records each request's SamplingParams: what the API filled in."""
    from tests.live import make_engine

    engine = make_engine(tokenizer)
    seen = []
    add = engine.core.add_request

    def recording_add(request_id, prompt_ids, params, *args, **kwargs):
        seen.append(params)
        return add(request_id, prompt_ids, params, *args, **kwargs)

    engine.core.add_request = recording_add
    defaults = {"temperature": 0.3, "top_p": 0.8, "top_k": 7}
    with live_server(tokenizer, engine=engine, sampling_defaults=defaults) as srv:
        client = anthropic.Anthropic(base_url=srv.base_url, api_key="x", max_retries=0)
        client.messages.create(model="tf-test", max_tokens=4, messages=CAPITAL)
        client.messages.create(model="tf-test", max_tokens=4, messages=CAPITAL,
                               extra_body={"temperature": 0.0, "top_k": 3})
        oai = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
        oai.chat.completions.create(model="tf-test", max_tokens=4, messages=CAPITAL, top_p=0.5)
    got = [(p.temperature, p.top_p, p.top_k) for p in seen]
    assert got == [(0.3, 0.8, 7), (0.0, 0.8, 3), (0.3, 0.5, 7)]


def test_generic_tool_format_puts_the_tools_in_the_prompt(real_server):
    """SmolLM2's template has no tool section: the tools are described in the system turn
    (docs/api.md, "Tools on any template"), so they cost prompt tokens and nothing is dropped."""
    client = anthropic.Anthropic(base_url=real_server.base_url, api_key="x", max_retries=0)
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    bare = client.messages.count_tokens(model="smollm2", messages=ask).input_tokens
    tooled = client.messages.count_tokens(model="smollm2", messages=ask,
                                          tools=[WEATHER_TOOL]).input_tokens
    assert tooled > bare + 40
    r = httpx.post(real_server.base_url + "/v1/messages", json={
        "model": "smollm2", "max_tokens": 2, "tools": [WEATHER_TOOL], "messages": ask},
        headers={"anthropic-version": "2023-06-01"}, timeout=60)
    assert r.status_code == 200 and "x-tokenfactory-tools-dropped" not in r.headers


ORDER = {"type": "object", "additionalProperties": False,
         "required": ["item", "quantity", "size"],
         "properties": {"item": {"type": "string", "maxLength": 24},
                        "quantity": {"type": "integer", "minimum": 1, "maximum": 9},
                        "size": {"enum": ["small", "medium", "large"]}}}
ORDER_TOOL = {"name": "place_order", "description": "Order a drink", "input_schema": ORDER}
ASK_ORDER = [{"role": "user", "content": "Two large lattes, please."}]


def test_forced_tool_call_streams_schema_valid_input(real_server):
    """tool_choice tool / any on the default model: the reply is a call of that tool whose
    input validates, and the input arrives as several input_json_delta fragments that
    reassemble to exactly the final input."""
    import json

    import jsonschema
    client = anthropic.Anthropic(base_url=real_server.base_url, api_key="x", max_retries=0)
    for choice in ({"type": "tool", "name": "place_order"}, {"type": "any"}):
        fragments = []
        with client.messages.stream(model="smollm2", max_tokens=64, messages=ASK_ORDER,
                                    tools=[WEATHER_TOOL, ORDER_TOOL], tool_choice=choice,
                                    extra_body={"temperature": 0.0}) as stream:
            for ev in stream:
                if ev.type == "content_block_delta" and ev.delta.type == "input_json_delta":
                    fragments.append(ev.delta.partial_json)
            final = stream.get_final_message()
        assert final.stop_reason == "tool_use"
        call = final.content[-1]
        assert call.type == "tool_use"
        schema = ORDER if call.name == "place_order" else WEATHER_TOOL["input_schema"]
        assert choice["type"] == "any" or call.name == "place_order"
        jsonschema.validate(call.input, schema)
        assert len(fragments) > 1 and json.loads("".join(fragments)) == call.input
    real_server.assert_no_leaks()


def test_openai_strict_and_required_tools(real_server):
    """strict: true with tool_choice required: schema-valid arguments, streamed as deltas."""
    import json

    import jsonschema
    client = openai.OpenAI(base_url=real_server.base_url + "/v1", api_key="x", max_retries=0)
    tools = [{"type": "function", "function": {"name": "place_order", "strict": True,
                                               "description": "Order a drink",
                                               "parameters": ORDER}}]
    for seed in range(2):
        deltas = []
        for chunk in client.chat.completions.create(
                model="smollm2", max_tokens=64, temperature=0.8, seed=seed, tools=tools,
                tool_choice="required", messages=ASK_ORDER, stream=True):
            for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                if tc.function and tc.function.arguments:
                    deltas.append(tc.function.arguments)
            if chunk.choices and chunk.choices[0].finish_reason:
                assert chunk.choices[0].finish_reason == "tool_calls"
        assert len(deltas) > 1
        jsonschema.validate(json.loads("".join(deltas)), ORDER)
    real_server.assert_no_leaks()


def test_claude_codes_first_request_gets_well_formed_blocks(real_server):
    """Claude Code's first request (its shape: tests/api/test_tolerance.py) on the default
    model, tool_choice auto: whatever the model decides, text blocks and tool_use blocks whose
    input validates against the tool's schema, in a well-formed stream."""
    import json

    import jsonschema

    from .test_tolerance import CC_HEADERS, TOOLS, cc_body
    body = cc_body()
    body["max_tokens"], body["model"] = 48, "smollm2"
    body["system"][2]["text"] = "Use the tools to change files. Be brief."
    body["messages"][0]["content"][1]["text"] = "Create a file notes.txt that says hello."
    with httpx.stream("POST", real_server.base_url + "/v1/messages?beta=true", json=body,
                      headers=CC_HEADERS, timeout=120) as r:
        assert r.status_code == 200
        frames = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    kinds = [f["type"] for f in frames]
    assert kinds[:2] == ["message_start", "ping"] and kinds[-1] == "message_stop"
    blocks, partial = {}, {}
    for f in frames:
        if f["type"] == "content_block_start":
            blocks[f["index"]] = f["content_block"]
        elif f["type"] == "content_block_delta" and f["delta"]["type"] == "input_json_delta":
            partial[f["index"]] = partial.get(f["index"], "") + f["delta"]["partial_json"]
    schema = TOOLS[0]["input_schema"]
    for i, block in blocks.items():
        assert block["type"] in ("text", "tool_use")
        if block["type"] == "tool_use":
            assert block["name"] == "Write"
            jsonschema.validate(json.loads(partial[i]), schema)
    stop = [f for f in frames if f["type"] == "message_delta"][0]["delta"]["stop_reason"]
    assert (stop == "tool_use") == any(b["type"] == "tool_use" for b in blocks.values())
    real_server.assert_no_leaks()


def test_a_template_with_tools_sends_no_such_header(server):
    """The scripted suite's tokenizer (a ChatML template with a tool section) shows tools."""
    body = {"model": "tf-test", "max_tokens": 2, "tools": [WEATHER_TOOL],
            "messages": [{"role": "user", "content": "[[reply:hello]]"}]}
    r = httpx.post(server.base_url + "/v1/messages", json=body,
                   headers={"anthropic-version": "2023-06-01"}, timeout=60)
    assert r.status_code == 200 and "x-tokenfactory-tools-dropped" not in r.headers


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}}}
ASK_PERSON = [{"role": "user", "content": "Invent a person. Reply in JSON with name and age."}]


def test_openai_response_format_json_schema(real_server):
    import json

    import jsonschema
    client = openai.OpenAI(base_url=real_server.base_url + "/v1", api_key="x", max_retries=0)
    for seed in range(3):
        r = client.chat.completions.create(
            model="smollm2", max_tokens=48, temperature=0.8, seed=seed, messages=ASK_PERSON,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
        assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="smollm2", max_tokens=48, temperature=0,
                                       messages=ASK_PERSON,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    real_server.assert_no_leaks()


def test_anthropic_output_config_format(real_server):
    import json

    import jsonschema
    client = anthropic.Anthropic(base_url=real_server.base_url, api_key="x", max_retries=0)
    with client.messages.stream(
            model="smollm2", max_tokens=48, messages=ASK_PERSON,
            extra_body={"temperature": 0.0,
                        "output_config": {"format": {"type": "json_schema",
                                                     "schema": PERSON}}}) as stream:
        text = "".join(stream.text_stream)
    jsonschema.validate(json.loads(text), PERSON)
    real_server.assert_no_leaks()


def test_a_schema_that_cannot_compile_is_a_400_in_each_protocol(real_server):
    bad = {"type": "object", "properties": {"x": {"allOf": [{"type": "string"},
                                                            {"type": "integer"}]}},
           "required": ["x"]}
    oai = openai.OpenAI(base_url=real_server.base_url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(
            model="smollm2", max_tokens=8, messages=ASK_PERSON,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "bad", "schema": bad, "strict": True}})
    assert e.value.body["type"] == "invalid_request_error"
    ant = anthropic.Anthropic(base_url=real_server.base_url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as e:
        ant.messages.create(model="smollm2", max_tokens=8, messages=ASK_PERSON,
                            extra_body={"output_config": {"format": {"type": "json_schema",
                                                                     "schema": bad}}})
    assert e.value.body["error"]["type"] == "invalid_request_error"
    real_server.assert_no_leaks()
