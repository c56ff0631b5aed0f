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


def test_tools_the_template_cannot_show_are_reported(real_server):
    body = {"model": "smollm2", "max_tokens": 2, "tools": [WEATHER_TOOL],
            "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    r = httpx.post(real_server.base_url + "/v1/messages", json=body,
                   headers={"anthropic-version": "2023-06-01"}, timeout=60)
    assert r.status_code == 200 and r.headers["x-tokenfactory-tools-dropped"] == "1"
    del body["tools"]
    r = httpx.post(real_server.base_url + "/v1/messages", json=body,
                   headers={"anthropic-version": "2023-06-01"}, timeout=60)
    assert r.status_code == 200 and "x-tokenfactory-tools-dropped" not in r.headers


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
