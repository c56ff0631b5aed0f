"""Structured outputs on the real default model (SmolLM2-135M-Instruct), in the engine.

Schemas come from a hypothesis-generated family (objects, arrays, enums, nesting, bounded
integers and strings); every output must parse and validate with ``jsonschema`` (a validator
nobody here wrote). The family is bounded so that any instance fits in ``max_tokens`` even at
one token per character: a truncated output would be a "length" finish, not a grammar fault,
and the test asserts that never happens. One float32 engine serves every test (the batch
isolation test needs float32: bf16 logits depend on the batch).
"""
from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from tokenfactory.engine.sampling_params import SamplingParams, StructuredOutput

KEYS = ["name", "id", "size", "color", "city", "count", "kind", "tags", "owner", "level"]
WORDS = ["red", "green", "blue", "small", "large", "yes", "no", "cat", "dog"]


@pytest.fixture(scope="module")
def llm():
    from tokenfactory import LLM
    from tokenfactory.model.default import DefaultModelMissing, default_model_path
    try:
        path = default_model_path()
    except DefaultModelMissing as exc:
        pytest.skip(str(exc))
    return LLM(path, dtype="float32", max_model_len=1024, kv_cache_memory=96 << 20,
               max_num_seqs=16)


def chat(llm, text: str) -> str:
    return llm.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             add_generation_prompt=True, tokenize=False)


def max_chars(schema: dict) -> int:
    """An upper bound on the length of a compact instance (a string char may be an escape)."""
    t = schema.get("type")
    if "enum" in schema:
        return max(len(json.dumps(v)) for v in schema["enum"])
    if t == "integer":
        return max(len(str(schema["minimum"])), len(str(schema["maximum"])))
    if t == "boolean":
        return 5
    if t == "string":
        return 2 + 6 * schema["maxLength"]
    if t == "array":
        return 2 + schema["maxItems"] * (max_chars(schema["items"]) + 1)
    return 2 + sum(len(k) + 4 + max_chars(v) for k, v in schema["properties"].items())


leaves = st.one_of(
    st.tuples(st.integers(-50, 50), st.integers(0, 200)).map(
        lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]}),
    st.lists(st.sampled_from(WORDS), min_size=1, max_size=4, unique=True).map(
        lambda ws: {"enum": ws}),
    st.integers(1, 8).map(lambda n: {"type": "string", "maxLength": n}),
    st.just({"type": "boolean"}),
)


def _containers(children):
    arrays = st.tuples(children, st.integers(1, 3)).map(
        lambda t: {"type": "array", "items": t[0], "maxItems": t[1]})
    objects = st.dictionaries(st.sampled_from(KEYS), children, min_size=1, max_size=3).map(
        lambda props: {"type": "object", "properties": props, "required": sorted(props),
                       "additionalProperties": False})
    return arrays | objects


# the top level is an object; nesting at most two levels below it
objects = st.dictionaries(st.sampled_from(KEYS), st.recursive(leaves, _containers, max_leaves=4),
                          min_size=1, max_size=3).map(
    lambda props: {"type": "object", "properties": props, "required": sorted(props),
                   "additionalProperties": False})
SCHEMA_BATCH = st.lists(objects.filter(lambda s: max_chars(s) <= 110), min_size=10, max_size=10,
                        unique_by=json.dumps)
MAX_TOKENS = 112


# a fixed seed (reproducible) rather than derandomize, whose first example is the minimal one
# (ten copies of the simplest schema); no shrinking: each example is a whole batch on the model
@seed(20261129)
@settings(max_examples=1, deadline=None, database=None, phases=[Phase.generate],
          suppress_health_check=list(HealthCheck))
@given(schemas=SCHEMA_BATCH)
def test_generated_schemas_give_valid_json_every_time(llm, schemas):
    """Ten schemas from the family, decoded together as one batch at temperature 0.7."""
    prompt = chat(llm, "Reply with a JSON object.")
    params = [SamplingParams(temperature=0.7, seed=i, max_tokens=MAX_TOKENS,
                             structured_output=StructuredOutput(json_schema=s))
              for i, s in enumerate(schemas)]
    outs = llm.generate([prompt] * len(schemas), params, use_tqdm=False)
    for schema, out in zip(schemas, outs):
        comp = out.outputs[0]
        assert comp.finish_reason == "stop", (schema, comp.text)
        jsonschema.validate(json.loads(comp.text), schema)


def test_unconstrained_batch_mate_gets_its_greedy_tokens(llm):
    """A batch mixing constrained rows (a schema, sampled; any JSON object, greedy) with an
    unconstrained greedy row: that row's tokens are exactly those it gets alone."""
    prompt = chat(llm, "Name three fruits.")
    plain = SamplingParams(temperature=0.0, max_tokens=16)
    alone = llm.generate([prompt], plain, use_tqdm=False)[0].outputs[0].token_ids
    schema = {"type": "object", "properties": {"fruits": {"type": "array", "items": {
        "type": "string", "maxLength": 10}, "maxItems": 3}}, "required": ["fruits"]}
    mixed = llm.generate(
        [prompt, prompt, prompt],
        [SamplingParams(temperature=0.7, seed=3, max_tokens=40,
                        structured_output=StructuredOutput(json_schema=schema)),
         plain,
         SamplingParams(temperature=0.0, max_tokens=40,
                        structured_output=StructuredOutput(json_object=True))], use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone
    jsonschema.validate(json.loads(mixed[0].outputs[0].text), schema)
    json_object = mixed[2].outputs[0]
    assert json_object.finish_reason == "stop" and isinstance(json.loads(json_object.text), dict)


def test_uncompilable_schema_is_refused_before_queueing(llm):
    bad = SamplingParams(max_tokens=8, structured_output=StructuredOutput(
        json_schema={"type": "object", "properties": {"n": {"type": "integer", "minimum": 9,
                                                             "maximum": 1}},
        "required": ["n"]}))
    with pytest.raises(ValueError) as err:
        llm.engine.add_request("bad", [1, 2, 3], bad)
    assert "\n" not in str(err.value) and "unsatisfiable" in str(err.value)
    assert not llm.engine.has_unfinished_requests()


def test_second_request_with_the_same_schema_hits_the_compile_cache(llm):
    from tokenfactory.text.grammar import compiler_for
    comp = compiler_for(llm.tokenizer)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}},
              "required": ["ok"], "additionalProperties": False}
    before = comp.num_compilations
    outs = llm.generate([chat(llm, "Is water wet?")] * 2, [SamplingParams(
        temperature=0.7, seed=seed, max_tokens=16,
        structured_output=StructuredOutput(json_schema=json.dumps(schema))) for seed in (1, 2)],
        use_tqdm=False)
    for out in outs:
        assert json.loads(out.outputs[0].text) in ({"ok": True}, {"ok": False})
    assert comp.num_compilations == before + 1
