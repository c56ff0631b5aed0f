"""Fuzzing: schemathesis against /openapi.json, and hypothesis over message structures.

Every answer must be a 2xx or a 4xx in the protocol's own error format: never a 5xx, never a
response that contradicts the declared schema, and no KV page may be left behind. The last
properties drive the real PyTorch executor and sampler (issue 13), not the scripted one.
"""
from __future__ import annotations

import itertools
import json
import threading

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from hypothesis import strategies as st

from .conftest import is_error_body, is_protocol_error, live_server

SCHEMATHESIS_EXAMPLES = 25   # per operation and phase (CI size; benchmarks/fuzz.py runs more)


@pytest.fixture(scope="module")
def fuzz_server(tokenizer):
    # max_output_tokens keeps generated "max_tokens: 10**9" cases quick (the clamp still applies)
    with live_server(tokenizer, max_output_tokens=24, aliases=[("claude-*", "tf-test")]) as s:
        yield s


def error_format_conformance(ctx, response, case):
    """Custom check: any 4xx/5xx body is the error format of the route's protocol."""
    if response.status_code >= 400:
        path = case.operation.path
        if not is_error_body(path, response.content):
            raise AssertionError(f"{response.status_code} body is not a {path} protocol error: "
                                 f"{response.content[:300]!r}")
    return True


def test_schemathesis_all_operations(fuzz_server):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.generation.modes import GenerationMode
    from schemathesis.specs.openapi import checks as oc

    schema = schemathesis.openapi.from_url(fuzz_server.base_url + "/openapi.json")
    schema.config.base_url = fuzz_server.base_url
    checks = [oc.status_code_conformance, oc.content_type_conformance,
              oc.response_schema_conformance, oc.response_headers_conformance]
    from schemathesis.checks import not_a_server_error
    checks.append(not_a_server_error)
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/messages", "POST /v1/messages/count_tokens", "POST /v1/chat/completions",
        "POST /v1/completions", "GET /v1/models", "GET /v1/models/{model_id}", "GET /health",
        "GET /metrics"}
    tried = {"cases": 0}
    with httpx.Client(timeout=60) as http:
        for op, mode in itertools.product(operations, list(GenerationMode)):
            # body-less GETs have almost nothing to vary: a few examples suffice
            examples = SCHEMATHESIS_EXAMPLES if op.method.upper() == "POST" else 5

            @settings(max_examples=examples, deadline=None, database=None,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                tried["cases"] += 1
                case.call_and_validate(base_url=fuzz_server.base_url, checks=checks,
                                       additional_checks=[error_format_conformance])
            try:
                run()
            except Unsatisfiable:
                # no parameters and no body: there is nothing to make invalid
                assert mode == GenerationMode.NEGATIVE and op.method.upper() in ("GET", "HEAD")
    assert tried["cases"] >= 200
    fuzz_server.assert_no_leaks()


# --------------------------------------------------------------------- hypothesis properties
# Raw JSON text lets us send what json.dumps would never produce: lone surrogate escapes.
LONE_SURROGATES = st.sampled_from(["\\ud800", "\\udfff", "\\ud83d", "\\ude00x", "a\\udbff"])


def json_text(s: str) -> str:
    return json.dumps(s)


text_values = st.one_of(
    st.text(max_size=40),
    st.just(""),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=20),
    st.sampled_from(["[[reply:tool]]", "[[reply:stop]]", "<tool_call>", "<|im_start|>", "{{ x }}",
                     "\x00", "\u202e", "🎉" * 5, "word " * 50]),
)


@st.composite
def raw_string(draw):
    """A JSON string literal, sometimes with a lone UTF-16 surrogate escape spliced in."""
    base = json_text(draw(text_values))
    if draw(st.booleans()):
        return base
    pos = draw(st.integers(1, len(base) - 1))
    return base[:pos] + draw(LONE_SURROGATES) + base[pos:] if base[pos - 1] != "\\" else base


def nested(depth: int):
    leaves = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                       st.floats(allow_nan=False), text_values)
    return st.recursive(leaves, lambda kids: st.one_of(
        st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=5), kids, max_size=3)),
        max_leaves=depth)


huge_numbers = st.one_of(st.integers(-10**30, 10**30), st.sampled_from([0, -1, 1, 2**31, 2**63,
                                                                        10**400]),
                         st.floats(allow_nan=False, allow_infinity=False))


def block(role: str):
    text = st.builds(lambda t, cc: {"type": "text", "text": t, **cc}, text_values,
                     st.sampled_from([{}, {"cache_control": {"type": "ephemeral"}},
                                      {"cache_control": {"type": "ephemeral", "ttl": "1h"}},
                                      {"cache_control": {"type": "bogus"}}]))
    tool_use = st.builds(lambda i, inp: {"type": "tool_use", "id": i, "name": "get_weather",
                                         "input": inp},
                         st.sampled_from(["toolu_1", "toolu_2", ""]),
                         st.dictionaries(st.text(max_size=4), nested(20), max_size=3))
    tool_result = st.builds(lambda i, c, e: {"type": "tool_result", "tool_use_id": i,
                                             "content": c, "is_error": e},
                            st.sampled_from(["toolu_1", "toolu_2", "nope"]),
                            st.one_of(text_values, st.lists(st.builds(
                                lambda t: {"type": "text", "text": t}, text_values), max_size=2)),
                            st.booleans())
    odd = st.sampled_from([{"type": "thinking", "thinking": "hm", "signature": "s"},
                           {"type": "redacted_thinking", "data": "x"},
                           {"type": "image", "source": {"type": "base64", "data": "AA"}},
                           {"type": "unknown_kind"}, {"text": "no type"}, {}, "just a string", 7])
    if role == "assistant":
        return st.one_of(text, tool_use, odd)
    return st.one_of(text, tool_result, odd)


@st.composite
def anthropic_message(draw):
    role = draw(st.sampled_from(["user", "assistant", "user", "system", "tool", ""]))
    if draw(st.booleans()):
        content = draw(text_values)
    else:
        content = draw(st.lists(block(role if role in ("user", "assistant") else "user"),
                                max_size=4))
    return {"role": role, "content": content}


@st.composite
def anthropic_body(draw):
    body = {"model": draw(st.sampled_from(["tf-test", "claude-x", "nope", ""])),
            "max_tokens": draw(st.one_of(st.integers(1, 32), huge_numbers)),
            "messages": draw(st.lists(anthropic_message(), max_size=5))}
    if draw(st.booleans()):
        body["system"] = draw(st.one_of(text_values, st.lists(st.builds(
            lambda t: {"type": "text", "text": t}, text_values), max_size=2)))
    if draw(st.booleans()):
        body["tools"] = [{"name": "get_weather", "input_schema": draw(st.one_of(
            st.just({"type": "object", "properties": {"city": {"type": "string"}}}),
            st.dictionaries(st.text(max_size=6), nested(15), max_size=3)))}]
        body["tool_choice"] = draw(st.sampled_from([{"type": "auto"}, {"type": "any"},
                                                    {"type": "tool", "name": "get_weather"},
                                                    {"type": "none"}, {"type": "tool"}]))
    for key, strat in [("temperature", huge_numbers), ("top_p", huge_numbers),
                       ("top_k", huge_numbers), ("stream", st.booleans()),
                       ("stop_sequences", st.lists(text_values, max_size=3)),
                       ("metadata", nested(10))]:
        if draw(st.integers(0, 3)) == 0:
            body[key] = draw(strat)
    return body


def encode_with_surrogates(draw, body) -> bytes:
    """Serialize, then splice lone-surrogate escapes into a few string literals."""
    text = json.dumps(body)
    if draw(st.booleans()):
        marker = '"role": "user", "content": "'
        i = text.find(marker)
        if i >= 0:
            j = i + len(marker)
            text = text[:j] + draw(LONE_SURROGATES) + text[j:]
    return text.encode("utf-8")


@st.composite
def anthropic_raw(draw):
    return encode_with_surrogates(draw, draw(anthropic_body()))


@st.composite
def openai_raw(draw):
    msgs = draw(st.lists(st.fixed_dictionaries({
        "role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "bot"]),
        "content": st.one_of(st.none(), text_values, st.lists(st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "image_url", "weird"]), "text": text_values}),
            max_size=2))}), max_size=4))
    body = {"model": draw(st.sampled_from(["tf-test", "nope"])), "messages": msgs,
            "max_tokens": draw(st.one_of(st.integers(1, 16), huge_numbers))}
    for key, strat in [("temperature", huge_numbers), ("n", st.integers(-2, 3)),
                       ("stop", st.one_of(text_values, st.lists(text_values, max_size=5))),
                       ("stream", st.booleans()), ("tools", st.lists(nested(8), max_size=2)),
                       ("tool_choice", st.one_of(st.sampled_from(["auto", "none", "required",
                                                                  "bogus"]), nested(6)))]:
        if draw(st.integers(0, 3)) == 0:
            body[key] = draw(strat)
    return encode_with_surrogates(draw, body)


def post_raw(server, path: str, raw: bytes) -> httpx.Response:
    return httpx.post(server.base_url + path, content=raw, timeout=60,
                      headers={"content-type": "application/json"})


def property_settings(examples: int):
    """Hypothesis settings of the body-property tests: a fixed example count, no deadline
    (the live server's latency is not the property), no example database, and the health
    checks that large generated bodies and the shared server fixture would trip."""
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


def check_answer(path: str, r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        assert is_protocol_error(path, r), r.text[:500]
    elif r.headers["content-type"].startswith("text/event-stream"):
        # a stream that started may still end with an error event, but only a protocol one
        assert "event: error" not in r.text or '"overloaded_error"' in r.text, r.text[-500:]
    else:
        r.json()


@property_settings(120)
@given(raw=anthropic_raw())
def test_property_anthropic_messages(fuzz_server, raw):
    check_answer("/v1/messages", post_raw(fuzz_server, "/v1/messages", raw))


@property_settings(40)
@given(raw=anthropic_raw())
def test_property_count_tokens(fuzz_server, raw):
    r = post_raw(fuzz_server, "/v1/messages/count_tokens", raw)
    check_answer("/v1/messages/count_tokens", r)
    if r.status_code == 200:
        assert isinstance(r.json()["input_tokens"], int)


@property_settings(80)
@given(raw=openai_raw())
def test_property_openai_chat(fuzz_server, raw):
    check_answer("/v1/chat/completions", post_raw(fuzz_server, "/v1/chat/completions", raw))


@settings(max_examples=30, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(depth=st.integers(1, 2000), leaf=raw_string())
def test_property_deeply_nested_tool_input(fuzz_server, depth, leaf):
    """Tool inputs nested thousands deep (raw JSON; beyond what json.dumps would recurse)."""
    inner = "[" * depth + leaf + "]" * depth
    raw = ('{"model":"tf-test","max_tokens":8,"messages":['
           '{"role":"user","content":"hi"},'
           '{"role":"assistant","content":[{"type":"tool_use","id":"toolu_1","name":"get_weather",'
           '"input":{"deep":' + inner + '}}]},'
           '{"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_1",'
           '"content":"ok"}]}]}').encode()
    check_answer("/v1/messages", post_raw(fuzz_server, "/v1/messages", raw))


def test_properties_left_nothing_behind(fuzz_server):
    fuzz_server.assert_no_leaks()


# ------------------------------------------------------ the real sampler (issue 13)
# The scripted executor above never samples: here the real PyTorch executor on the random-weight
# demo model does, with sampling parameters at the extremes of their JSON types. Every answer
# must be a 200 or a 400 naming the problem, and a greedy request sharing the engine with the
# attacks must produce exactly the text it produces alone (float32: greedy does not depend on
# batch composition there).
ANY_FLOAT = st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                     st.integers(-2**70, 2**70))
ANY_INT = st.integers(-2**64, 2**64)
TINY = [5e-324, 1e-300, 1e-30]


def edge(valid: list, anything) -> st.SearchStrategy:
    """Mostly a valid value at the edge of the field's range, sometimes anything of its type."""
    return st.one_of(st.sampled_from(valid), st.sampled_from(valid), st.sampled_from(valid),
                     anything)


SAMPLING_FIELDS = {
    "temperature": edge([0.0, -0.0, *TINY, 1e-5, 2.0], ANY_FLOAT),
    "top_p": edge([*TINY, 1e-6, 1.0], ANY_FLOAT),
    "top_k": edge([0, -1, 1, 2, 8191, 8192, 49152, 2**31, 2**63 - 1, 2**63, 10**20], ANY_INT),
    "min_p": edge([0.0, *TINY, 0.999999, 1.0], ANY_FLOAT),
    "presence_penalty": edge([-2.0, -1e-300, 2.0], ANY_FLOAT),
    "frequency_penalty": edge([-2.0, 1e-300, 2.0], ANY_FLOAT),
    "repetition_penalty": edge([*TINY, 1e-3, 100.0], ANY_FLOAT),
    "seed": edge([0, -1, 2**63 - 1, -(2**63), 2**64 - 1], ANY_INT),
    "min_tokens": edge([0, 1, 4], ANY_INT),
    "ignore_eos": st.booleans(),
    "stop_token_ids": st.lists(edge([0, 1, 2, 8191], ANY_INT), max_size=4),
    "stream": st.booleans()}
STATUSES: dict[str, set[int]] = {}


GREEDY = {"model": "tf-test", "max_tokens": 12, "temperature": 0.0, "ignore_eos": True,
          "messages": [{"role": "user", "content": "The victim's steady request"}]}


@st.composite
def extreme_sampling(draw):
    fields = draw(st.lists(st.sampled_from(sorted(SAMPLING_FIELDS)), unique=True, max_size=6))
    body = {k: draw(SAMPLING_FIELDS[k]) for k in fields}
    body["max_tokens"] = draw(st.integers(1, 4))
    return body


@pytest.fixture(scope="module")
def real_sampler_server():
    from tokenfactory.engine.async_engine import AsyncEngine
    from tokenfactory.engine.llm import build_engine_core
    from tokenfactory.model.demo import ensure_demo_checkpoint

    core = build_engine_core(ensure_demo_checkpoint(), dtype="float32", compile=False,
                             max_model_len=512, kv_cache_memory=16 << 20)
    with live_server(core.tokenizer, engine=AsyncEngine(core)) as srv:
        r = httpx.post(srv.base_url + "/v1/chat/completions", json=GREEDY, timeout=120)
        assert r.status_code == 200, r.text
        srv.greedy_text = r.json()["choices"][0]["message"]["content"]
        yield srv


def _attack_and_victim(server, path: str, attack: dict) -> tuple[httpx.Response, str]:
    """Send ``attack`` and the greedy victim at the same time; (attack's answer, victim's text)."""
    out = {}

    def victim():
        out["victim"] = httpx.post(server.base_url + "/v1/chat/completions", json=GREEDY,
                                   timeout=120)
    t = threading.Thread(target=victim)
    t.start()
    out["attack"] = httpx.post(server.base_url + path, json=attack, timeout=120)
    t.join()
    assert out["victim"].status_code == 200, out["victim"].text
    return out["attack"], out["victim"].json()["choices"][0]["message"]["content"]


def check_real_answer(path: str, r: httpx.Response) -> None:
    STATUSES.setdefault(path, set()).add(r.status_code)
    assert r.status_code in (200, 400), (r.status_code, r.text[:500])
    if r.status_code == 400:
        assert is_protocol_error(path, r), r.text[:500]
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert '"error"' not in r.text, r.text[-500:]   # the attack's own stream completes
        assert r.text.rstrip().endswith("data: [DONE]"), r.text[-200:]
    else:
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length"), r.text[:500]


@property_settings(30)
@given(sampling=extreme_sampling())
def test_property_real_sampler_chat(real_sampler_server, sampling):
    attack = {"model": "tf-test", "messages": [{"role": "user", "content": "attack"}], **sampling}
    r, victim = _attack_and_victim(real_sampler_server, "/v1/chat/completions", attack)
    check_real_answer("/v1/chat/completions", r)
    assert victim == real_sampler_server.greedy_text


@property_settings(20)
@given(sampling=extreme_sampling())
def test_property_real_sampler_completions(real_sampler_server, sampling):
    attack = {"model": "tf-test", "prompt": "attack", **sampling}
    r, victim = _attack_and_victim(real_sampler_server, "/v1/completions", attack)
    check_real_answer("/v1/completions", r)
    assert victim == real_sampler_server.greedy_text


ANTHROPIC_SAMPLING = {k: SAMPLING_FIELDS[k] for k in ("temperature", "top_p", "top_k", "seed",
                                                       "min_tokens", "ignore_eos", "stream")}


@property_settings(15)
@given(fields=st.lists(st.sampled_from(sorted(ANTHROPIC_SAMPLING)), unique=True, max_size=5),
       data=st.data())
def test_property_real_sampler_messages(real_sampler_server, fields, data):
    attack = {"model": "tf-test", "max_tokens": data.draw(st.integers(1, 4)),
              "messages": [{"role": "user", "content": "attack"}],
              **{k: data.draw(ANTHROPIC_SAMPLING[k]) for k in fields}}
    r, victim = _attack_and_victim(real_sampler_server, "/v1/messages", attack)
    path = "/v1/messages"
    STATUSES.setdefault(path, set()).add(r.status_code)
    assert r.status_code in (200, 400), (r.status_code, r.text[:500])
    if r.status_code == 400:
        assert is_protocol_error(path, r), r.text[:500]
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert "event: error" not in r.text and "event: message_stop" in r.text, r.text[-500:]
    else:
        assert r.json()["stop_reason"] in ("end_turn", "max_tokens"), r.text[:500]
    assert victim == real_sampler_server.greedy_text


def test_real_sampler_left_nothing_behind(real_sampler_server):
    # both kinds of answer were seen: the extremes reached the sampler, not only the 400s
    assert all(STATUSES.get(p) == {200, 400} for p in ("/v1/chat/completions",
                                                         "/v1/completions", "/v1/messages")), \
        STATUSES
    real_sampler_server.assert_no_leaks()
