"""Request bodies -> StructuredOutput (api/structured.py): the OpenAI and Anthropic shapes, as the
servers' own pydantic models parse them, and the 400s for what cannot be served."""
from __future__ import annotations

import pytest

from tokenfactory.api.anthropic_models import MessagesRequest
from tokenfactory.api.errors import APIError
from tokenfactory.api.openai_models import ChatCompletionRequest
from tokenfactory.api.structured import from_anthropic, from_openai

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
BAD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 3, "maximum": 1}},
       "required": ["a"]}


def openai_body(**extra):
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **extra)


def anthropic_body(messages=None, **extra):
    return MessagesRequest(model="m", max_tokens=8,
                           messages=messages or [{"role": "user", "content": "hi"}], **extra)


def test_openai_response_formats(tokenizer):
    assert from_openai(openai_body(), tokenizer) is None
    assert from_openai(openai_body(response_format={"type": "text"}), tokenizer) is None
    assert from_openai(openai_body(response_format={"type": "json_object"}), tokenizer).json_object
    spec = from_openai(openai_body(response_format={"type": "json_schema", "json_schema": {
        "name": "thing", "schema": SCHEMA, "strict": True}}), tokenizer)
    assert spec.json_schema == SCHEMA and spec.strict
    lenient = from_openai(openai_body(response_format={"type": "json_schema", "json_schema": {
        "name": "thing", "schema": SCHEMA}}), tokenizer)
    assert not lenient.strict and lenient.key != spec.key


@pytest.mark.parametrize("rf, param, fragment", [
    ({"type": "grammar"}, "response_format.type", "must be one of"),
    ({"type": "json_schema"}, "response_format.json_schema", "must be an object"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema",
     "required"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": BAD, "strict": True}},
     "response_format.json_schema.schema", "cannot compile the JSON schema"),
    ({"type": "json_schema", "json_schema": {"schema": "[1]"}},
     "response_format.json_schema.schema", "JSON object"),
    ("json", "response_format", "must be an object"),
])
def test_openai_bad_response_format_is_a_400(tokenizer, rf, param, fragment):
    with pytest.raises(APIError) as err:
        from_openai(openai_body(response_format=rf), tokenizer)
    e = err.value
    assert e.status == 400 and e.param == param and fragment in e.message
    assert "\n" not in e.message


def test_anthropic_output_config_format(tokenizer):
    assert from_anthropic(anthropic_body(), tokenizer) is None
    assert from_anthropic(anthropic_body(output_config={"effort": "low"}), tokenizer) is None
    spec = from_anthropic(anthropic_body(
        output_config={"format": {"type": "json_schema", "schema": SCHEMA}}), tokenizer)
    assert spec.json_schema == SCHEMA and spec.strict
    beta = from_anthropic(anthropic_body(
        output_format={"type": "json_schema", "schema": SCHEMA}), tokenizer)
    assert beta.key == spec.key


@pytest.mark.parametrize("body, param, fragment", [
    (dict(output_config={"format": {"type": "json_schema", "schema": BAD}}),
     "output_config.format.schema", "cannot compile"),
    (dict(output_config={"format": {"type": "text"}}), "output_config.format.type",
     "json_schema"),
    (dict(output_config={"format": {"type": "json_schema"}}), "output_config.format.schema",
     "required"),
    (dict(output_config={"format": {"type": "json_schema", "schema": SCHEMA}},
          messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "{"}]),
     "output_config.format", "prefilled"),
])
def test_anthropic_bad_format_is_a_400(tokenizer, body, param, fragment):
    with pytest.raises(APIError) as err:
        from_anthropic(anthropic_body(**body), tokenizer)
    e = err.value
    assert e.status == 400 and e.param == param and fragment in e.message
