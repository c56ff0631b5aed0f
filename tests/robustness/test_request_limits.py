"""Issue 13, request handling: cheap rejections first, strict edges, no 500s, no cut streams.

* a prompt whose size alone exceeds the context is refused before any rendering or tokenizing
  (30 MB: a 400 while /health keeps answering, and not one character reaches the tokenizer);
* a full queue answers 529/429 before the prompt is tokenized;
* cache breakpoints cost the tokens of their last turn, not the whole prompt again, and give
  exactly the positions a full tokenization of each truncated rendering gives;
* stop_token_ids are capped and must be in the vocabulary; types are strict; lone surrogates
  anywhere are a 400 in the protocol's format; duplicate tool_use ids and empty content are
  400s; an exception in the middle of any stream ends it with a protocol error event.
"""
from __future__ import annotations

import json
import threading

import httpx
import pytest

from tests.live import parse_sse

from .conftest import (HEADERS, WEATHER_TOOL, check_anthropic_error, check_openai_error,
                       live_server)

MSG = {"model": "tf-test", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
CHAT = {"model": "tf-test", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
OPENAI = ("/v1/chat/completions", "/v1/completions")


@pytest.fixture(scope="module")
def server(tokenizer):
    # max_output_tokens: the clamped header of an omitted max_tokens is visible
    with live_server(tokenizer, min_cache_tokens=64, max_output_tokens=8) as s:
        yield s


def post(server, path, body=None, raw=None, timeout=60.0):
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(server.base_url + path, content=content, headers=HEADERS, timeout=timeout)


def check_error(path, r, status=400, etype="invalid_request_error", fragment=None, param=None):
    if path.startswith(OPENAI):
        msg = check_openai_error(r, status, etype)
        if param is not None:
            assert (r.json()["error"]["param"] or "").split(".")[0] == param, r.json()
    else:
        msg = check_anthropic_error(r, status, etype)
    if fragment is not None:
        assert fragment in msg, msg
    return msg


def encoded_chars(server) -> int:
    return server.app.state.ctx.encoded_chars


# ------------------------------------------------------------------ cheap rejections
def test_30mb_prompt_is_refused_before_tokenizing_while_health_answers(server):
    big = "word " * (6 * 1024 * 1024)   # 30 MiB of text: ~6M tokens, the context holds 8192
    before = encoded_chars(server)
    result = {}

    def send():
        result["r"] = post(server, "/v1/messages", {**MSG, "messages": [
            {"role": "user", "content": big}]}, timeout=120)
    sender = threading.Thread(target=send)
    sender.start()
    health = []
    while sender.is_alive() or not health:
        # hang guard only: before the fix the server froze for over a minute
        health.append(httpx.get(server.base_url + "/health", timeout=10).status_code)
    sender.join()
    assert set(health) == {200}
    check_error("/v1/messages", result["r"], fragment="prompt is too long")
    assert encoded_chars(server) == before   # not one character was tokenized
    server.assert_no_leaks()


@pytest.mark.parametrize("path", ["/v1/messages/count_tokens", "/v1/chat/completions",
                                  "/v1/completions"])
def test_oversized_prompt_refused_on_every_route_without_tokenizing(server, path):
    big = "lorem ipsum " * 200_000   # 2.4 MB
    if path == "/v1/completions":
        body = {"model": "tf-test", "prompt": big}
    elif path == "/v1/chat/completions":
        body = {**CHAT, "messages": [{"role": "system", "content": "be brief"},
                                     {"role": "user", "content": big}]}
    else:
        body = {"model": "tf-test", "messages": [{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": big}]}]}
        body["messages"].insert(0, {"role": "assistant", "content": [
            {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}]})
        body["messages"].insert(0, {"role": "user", "content": "weather?"})
        body["tools"] = [WEATHER_TOOL]
    before = encoded_chars(server)
    check_error(path, post(server, path, body), fragment="prompt is too long")
    assert encoded_chars(server) == before


def test_token_id_prompt_over_the_context_refused_before_any_scan(server):
    r = post(server, "/v1/completions", {"model": "tf-test", "prompt": [5] * 9000})
    check_error("/v1/completions", r, fragment="prompt is too long")


def test_prompt_just_under_the_byte_bound_is_still_served_exactly(server):
    """The bound only refuses what cannot fit: a prompt that fits is tokenized and served."""
    text = "x " * 2000
    r = post(server, "/v1/messages", {**MSG, "messages": [{"role": "user", "content": text}]})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path,status", [("/v1/messages", 529), ("/v1/chat/completions", 429),
                                         ("/v1/completions", 429)])
def test_full_queue_answers_before_the_prompt_is_tokenized(tokenizer, path, status):
    with live_server(tokenizer, engine_kwargs={"max_queued_requests": 0}) as srv:
        body = ({"model": "tf-test", "prompt": "hello " * 500} if path == "/v1/completions"
                else {**MSG, "messages": [{"role": "user", "content": "hello " * 500}]})
        r = post(srv, path, body)
        check_error(path, r, status, "overloaded_error" if status == 529 else "rate_limit_error",
                    fragment="overloaded")
        assert r.headers["retry-after"] == "1"
        assert encoded_chars(srv) == 0
        srv.assert_no_leaks()


# ------------------------------------------------------------------ breakpoints: once
def _breakpoint_request(doc: str) -> dict:
    cc = {"type": "ephemeral"}
    return {"model": "tf-test", "system": [{"type": "text", "text": doc, "cache_control": cc}],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "first question",
                                              "cache_control": cc}]},
                {"role": "assistant", "content": [{"type": "text", "text": "an answer",
                                                   "cache_control": cc}]},
                {"role": "user", "content": [{"type": "text", "text": "second question",
                                              "cache_control": cc}]}]}


def test_count_tokens_with_four_breakpoints_tokenizes_the_prompt_once(server):
    doc = " ".join(f"Rule {i}: keep answers short." for i in range(800))   # ~24K chars
    body = _breakpoint_request(doc)
    before = encoded_chars(server)
    n_with = post(server, "/v1/messages/count_tokens", body).json()["input_tokens"]
    with_bps = encoded_chars(server) - before
    for m in body["messages"]:
        m["content"][0].pop("cache_control")
    body["system"][0].pop("cache_control")
    before = encoded_chars(server)
    n_without = post(server, "/v1/messages/count_tokens", body).json()["input_tokens"]
    without = encoded_chars(server) - before
    assert n_with == n_without
    # the full prompt once, plus each breakpoint's last turn (a few dozen characters each);
    # before the fix this was ~5x the prompt (the system breakpoint renders two variants)
    assert without >= len(doc) and with_bps - without < 400, (with_bps, without)


def test_breakpoint_usage_unchanged_by_the_shortcut(server):
    """Cache writes/reads of a 4-breakpoint request equal what full tokenizations give."""
    doc = " ".join(f"Clause {i} applies." for i in range(300))
    body = {**_breakpoint_request(doc), "max_tokens": 4}
    first = post(server, "/v1/messages", body).json()["usage"]
    second = post(server, "/v1/messages", body).json()["usage"]
    total = first["input_tokens"] + first["cache_creation_input_tokens"]
    assert first["cache_read_input_tokens"] == 0 and first["cache_creation_input_tokens"] > 0
    assert second["cache_read_input_tokens"] == first["cache_creation_input_tokens"]
    assert second["input_tokens"] + second["cache_read_input_tokens"] \
        + second["cache_creation_input_tokens"] == total


def _truncations(tokenizer):
    """(full text, truncated rendering) pairs from real requests, with cuts inside turns, at
    turn ends, in the system prompt, and text that spells special tokens or ends mid-marker."""
    from tokenfactory.api.anthropic_models import MessagesRequest
    from tokenfactory.api.anthropic_prompt import PromptBuilder

    class Ctx:   # what PromptBuilder reads
        options = type("O", (), {"max_stop_sequences": 32, "min_cache_tokens": 0})()
        strip_re = None
        parser_name = None

    Ctx.tokenizer = tokenizer
    tricky = ["plain words", "ends with spaces   ", "digits 12345678", "<|im_start|>user spoof",
              "partial <|im_", "  leading", "émoji 🎉 and 世界", "\n\nnewlines\n", "tab\tend",
              "x" * 300]
    pairs = []
    for a, b in zip(tricky, tricky[1:] + tricky[:1]):
        cc = {"type": "ephemeral"}
        req = MessagesRequest.model_validate({
            "model": "m", "max_tokens": 1,
            "system": [{"type": "text", "text": a, "cache_control": cc},
                       {"type": "text", "text": b}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": b,
                                                       "cache_control": cc},
                                                      {"type": "text", "text": a}]},
                         {"role": "assistant", "content": a, },
                         {"role": "user", "content": [{"type": "text", "text": a + b,
                                                       "cache_control": cc}]}]})
        builder = PromptBuilder(Ctx, req)
        full, _, _ = builder.render_full()
        for spec in builder.breakpoint_specs():
            pairs += [(full, t) for t in builder.render_truncated(spec.position)]
        pairs += [(full, full[:k]) for k in range(0, len(full), max(1, len(full) // 40))]
    return pairs


@pytest.fixture(scope="module")
def real_tokenizer():
    from tokenfactory.model.default import default_model_path
    from tokenfactory.text.tokenizer import Tokenizer
    return Tokenizer.from_pretrained(default_model_path())


@pytest.mark.parametrize("which", ["demo", "smollm2"])
def test_shared_prefix_tokens_equals_full_tokenization(tokenizer, real_tokenizer, which):
    from tokenfactory.api.caching import (TokenizedText, common_prefix_len, shared_prefix_tokens,
                                          split_tokens)
    tok = tokenizer if which == "demo" else real_tokenizer
    splits = split_tokens(tok)
    assert splits, "no split tokens: the shortcut would never be taken"
    tail_chars = 0
    pairs = _truncations(tok)
    for full_text, text in pairs:
        enc = tok.backend.encode(full_text, add_special_tokens=False)
        full = TokenizedText(full_text, list(enc.ids), list(enc.offsets))
        seen = []

        def encode(t):
            seen.append(len(t))
            return tok.encode(t)
        assert shared_prefix_tokens(full, text, encode, splits) == \
            common_prefix_len(full.ids, tok.encode(text)), (full_text, text)
        tail_chars += sum(seen)
    assert tail_chars < sum(len(t) for _, t in pairs) / 2   # the shortcut was taken


# ------------------------------------------------------------------ list caps, strict types
@pytest.mark.parametrize("path", OPENAI)
def test_a_million_stop_token_ids_is_a_400(server, path):
    body = ({**CHAT} if path == "/v1/chat/completions"
            else {"model": "tf-test", "prompt": "hi", "max_tokens": 4})
    r = post(server, path, {**body, "stop_token_ids": list(range(1_000_000))})
    check_error(path, r, param="stop_token_ids")


@pytest.mark.parametrize("ids,ok", [([5] * 1024, True), ([5] * 1025, False), ([8192], False),
                                    ([-1], False), ([2**63], False), (["5"], False)])
def test_stop_token_ids_bounds(server, ids, ok):
    r = post(server, "/v1/chat/completions", {**CHAT, "stop_token_ids": ids})
    if ok:
        assert r.status_code == 200, r.text
    else:
        check_error("/v1/chat/completions", r, param="stop_token_ids")


@pytest.mark.parametrize("path,patch", [
    ("/v1/messages", {"stream": "yes"}), ("/v1/messages", {"max_tokens": True}),
    ("/v1/messages", {"max_tokens": "8"}), ("/v1/messages", {"max_tokens": 8.0}),
    ("/v1/messages", {"temperature": "0.5"}), ("/v1/messages", {"top_k": 1.5}),
    ("/v1/messages", {"ignore_eos": "true"}),
    ("/v1/chat/completions", {"stream": "yes"}), ("/v1/chat/completions", {"max_tokens": True}),
    ("/v1/chat/completions", {"n": "1"}), ("/v1/chat/completions", {"temperature": False}),
    ("/v1/chat/completions", {"stream_options": {"include_usage": 1}, "stream": True}),
    ("/v1/completions", {"echo": "yes"}), ("/v1/completions", {"prompt": [1, True]}),
])
def test_strict_types(server, path, patch):
    base = {"model": "tf-test", "prompt": "hi"} if path == "/v1/completions" else \
        (MSG if path == "/v1/messages" else CHAT)
    check_error(path, post(server, path, {**base, **patch}))


@pytest.mark.parametrize("field,value", [
    ("presence_penalty", 5.0), ("frequency_penalty", -3.0), ("repetition_penalty", 0.0),
    ("repetition_penalty", 1e9), ("min_p", 2.0), ("top_k", -5), ("seed", 2**70),
    ("temperature", 3.0), ("top_p", 0.0), ("min_tokens", -1)])
def test_out_of_range_sampling_values_name_the_parameter(server, field, value):
    check_error("/v1/chat/completions", post(server, "/v1/chat/completions",
                                             {**CHAT, field: value}), param=field)


@pytest.mark.parametrize("path,patch", [
    ("/v1/chat/completions", {"top_k": 10**20}), ("/v1/chat/completions", {"top_k": 2**63}),
    ("/v1/messages", {"top_k": 10**20}), ("/v1/chat/completions", {"temperature": 1e-300}),
    ("/v1/messages", {"temperature": 5e-324})])
def test_extreme_but_meaningful_values_are_served(server, path, patch):
    """top_k beyond the vocabulary is clamped (= off); a subnormal temperature is greedy."""
    r = post(server, path, {**(MSG if path == "/v1/messages" else CHAT), **patch})
    assert r.status_code == 200, r.text


def test_clamped_header_of_an_omitted_completions_max_tokens(server):
    r = post(server, "/v1/completions", {"model": "tf-test", "prompt": "hello"})
    assert r.status_code == 200, r.text
    assert r.headers["x-tokenfactory-max-tokens-clamped"] == "16->8"   # the API's default 16


# ------------------------------------------------------------------ Anthropic semantics
def test_duplicate_tool_use_ids_are_a_400(server):
    use = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}
    body = {**MSG, "tools": [WEATHER_TOOL], "messages": [
        {"role": "user", "content": "weather?"}, {"role": "assistant", "content": [use, use]},
        {"role": "user", "content": [result]}]}
    check_error("/v1/messages", post(server, "/v1/messages", body), fragment="unique")


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": ""}],
    [{"role": "user", "content": []}],
    [{"role": "user", "content": [{"type": "text", "text": ""}]}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""},
     {"role": "user", "content": "b"}]])
def test_empty_content_is_a_400(server, messages):
    check_error("/v1/messages", post(server, "/v1/messages", {**MSG, "messages": messages}),
                fragment="non-empty")


def test_an_empty_final_assistant_prefill_is_fine(server):
    r = post(server, "/v1/messages", {**MSG, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]})
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------ lone surrogates
S = "\\ud800"   # as the JSON text spells it
_TOOL = '{"name":"get_weather","input_schema":{"type":"object"}}'
SURROGATE_CASES = [
    ("/v1/messages", f'{{"model":"tf-test{S}","max_tokens":4,"messages":[{{"role":"user","content":"hi"}}]}}'),
    ("/v1/messages", f'{{"model":"tf-test","max_tokens":4,"stream":true,"messages":[{{"role":"user","content":"hi{S}"}}]}}'),
    ("/v1/messages", f'{{"model":"tf-test","max_tokens":4,"system":"sys{S}","messages":[{{"role":"user","content":"hi"}}]}}'),
    ("/v1/messages", f'{{"model":"tf-test","max_tokens":4,"messages":[{{"role":"user","content":[{{"type":"text","text":"a{S}b"}}]}}]}}'),
    ("/v1/messages", '{"model":"tf-test","max_tokens":4,"tools":[' + _TOOL + '],"messages":['
     '{"role":"user","content":"w?"},{"role":"assistant","content":[{"type":"tool_use","id":"t' + S
     + '","name":"get_weather","input":{}}]},{"role":"user","content":[{"type":"tool_result",'
     '"tool_use_id":"t' + S + '","content":"ok"}]}]}'),
    ("/v1/messages", '{"model":"tf-test","max_tokens":4,"tools":[' + _TOOL + '],"tool_choice":'
     '{"type":"tool","name":"get_weather' + S + '"},"messages":[{"role":"user","content":"hi"}]}'),
    ("/v1/messages", '{"model":"tf-test","max_tokens":4,"tools":[{"name":"get_weather",'
     '"input_schema":{"type":"object","properties":{"c":{"description":"x' + S + '"}}}}],'
     '"messages":[{"role":"user","content":"hi"}]}'),
    ("/v1/messages", f'{{"model":"tf-test","max_tokens":4,"metadata":{{"k{S}":1}},"messages":[{{"role":"user","content":"hi"}}]}}'),
    ("/v1/messages/count_tokens", f'{{"model":"tf-test","messages":[{{"role":"user","content":"hi{S}"}}]}}'),
    ("/v1/chat/completions", f'{{"model":"tf-test{S}","messages":[{{"role":"user","content":"hi"}}]}}'),
    ("/v1/chat/completions", f'{{"model":"tf-test","stream":true,"messages":[{{"role":"user","content":"hi{S}"}}]}}'),
    ("/v1/chat/completions", f'{{"model":"tf-test","stop":["x{S}"],"messages":[{{"role":"user","content":"hi"}}]}}'),
    ("/v1/chat/completions", '{"model":"tf-test","tools":[{"type":"function","function":{"name":"f'
     + S + '"}}],"messages":[{"role":"user","content":"hi"}]}'),
    ("/v1/completions", f'{{"model":"tf-test","prompt":"hi{S}"}}'),
    ("/v1/completions", f'{{"model":"tf-test{S}","stream":true,"prompt":"hi"}}'),
]


@pytest.mark.parametrize("path,raw", SURROGATE_CASES)
def test_lone_surrogates_anywhere_are_a_400(server, path, raw):
    r = post(server, path, raw=raw.encode())
    check_error(path, r, fragment="surrogate")
    server.assert_no_leaks()


def test_lone_surrogate_through_an_alias_generates_nothing(tokenizer):
    with live_server(tokenizer, aliases=[("claude-*", "tf-test")]) as srv:
        raw = f'{{"model":"claude-x{S}","max_tokens":4,"messages":[{{"role":"user","content":"hi"}}]}}'
        check_error("/v1/messages", post(srv, "/v1/messages", raw=raw.encode()))
        assert srv.core.num_steps == 0   # nothing was generated (and billed) before the 400


# ------------------------------------------------------------------ streams cut by exceptions
@pytest.fixture
def failing_events(monkeypatch):
    """Generation.events raising a plain exception after its third event, as any bug in the
    framing code would: the handler must still end the stream with a protocol error event."""
    from tokenfactory.api.serving import Generation
    original = Generation.events

    async def events(self):
        agen = original(self)
        try:
            n = 0
            async for ev in agen:
                yield ev
                n += 1
                if n == 3:
                    raise RuntimeError("injected failure in the middle of a stream")
        finally:
            await agen.aclose()
    monkeypatch.setattr(Generation, "events", events)


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/chat/completions", "/v1/completions"])
def test_stream_cut_by_an_exception_ends_with_an_error_event(server, failing_events, path):
    text = "[[reply:long]]"
    body = ({"model": "tf-test", "prompt": text, "max_tokens": 8} if path == "/v1/completions"
            else {**MSG, "messages": [{"role": "user", "content": text}]})
    with httpx.stream("POST", server.base_url + path, json={**body, "stream": True},
                      headers=HEADERS, timeout=60) as r:
        assert r.status_code == 200
        frames = parse_sse("".join(r.iter_text()))
    if path == "/v1/messages":
        assert frames[-1][0] == "error", frames[-3:]
        assert frames[-1][1]["error"]["type"] == "api_error"
        assert any(e == "content_block_delta" for e, _ in frames)   # it was cut mid-way
    else:
        assert frames[-1] == (None, "[DONE]"), frames[-3:]
        err = frames[-2][1]
        assert err["error"]["type"] == "server_error" and "RuntimeError" in err["error"]["message"]
    server.assert_no_leaks()


# ------------------------------------------------------------------ the real model
@pytest.fixture(scope="module")
def smollm2_server():
    """SmolLM2-135M-Instruct (GGUF) in float32, where greedy text does not depend on what
    shares the batch or the prefix cache; two tenants."""
    from tokenfactory.engine.async_engine import AsyncEngine
    from tokenfactory.engine.llm import build_engine_core
    from tokenfactory.model.default import default_model_path

    core = build_engine_core(default_model_path(), dtype="float32", compile=False,
                             max_model_len=2048, kv_cache_memory=64 << 20)
    with live_server(core.tokenizer, engine=AsyncEngine(core), served_model_name="smollm2",
                     api_keys={"key-a": "A", "key-b": "B"}) as srv:
        yield srv


def test_victim_stream_unchanged_while_another_tenant_attacks(smollm2_server):
    srv = smollm2_server
    victim_body = {"model": "smollm2", "max_tokens": 24, "temperature": 0.0, "stream": True,
                   "messages": [{"role": "user", "content": "What is the capital of France?"}]}

    def victim() -> str:
        with httpx.stream("POST", srv.base_url + "/v1/messages", json=victim_body, timeout=300,
                          headers={**HEADERS, "x-api-key": "key-b"}) as r:
            assert r.status_code == 200
            frames = parse_sse("".join(r.iter_text()))
        assert frames[-1][0] == "message_stop", frames[-3:]
        return "".join(d["delta"].get("text", "") for e, d in frames
                       if e == "content_block_delta")
    alone = victim()
    assert "Paris" in alone

    a = {**HEADERS, "x-api-key": "key-a"}
    chat = {"model": "smollm2", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    attacks = [   # (path, body or raw bytes, the statuses it may get); the sampler ones first
        ("/v1/chat/completions", {**chat, "top_k": 10**20, "temperature": 1e-300}, {200}),
        ("/v1/chat/completions", {**chat, "repetition_penalty": 1e-300, "top_p": 5e-324}, {200}),
        ("/v1/chat/completions", {**chat, "stop_token_ids": list(range(1_000_000))}, {400}),
        ("/v1/completions", {"model": "smollm2", "prompt": "x", "top_k": 2**63,
                             "presence_penalty": -2.0, "seed": 2**64 - 1}, {200}),
        ("/v1/messages", ('{"model":"smollm2\\ud800","max_tokens":4,"stream":true,'
                          '"messages":[{"role":"user","content":"hi"}]}').encode(), {400}),
        ("/v1/messages", {**chat, "messages": [{"role": "user", "content": "w " * (15 << 20)}]},
         {400}),
    ]
    results: dict[int, int] = {}

    def attack():
        for i, (path, body, _) in enumerate(attacks):
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            results[i] = httpx.post(srv.base_url + path, content=content, headers=a,
                                    timeout=300).status_code
    attacker = threading.Thread(target=attack)
    attacker.start()
    during = victim()
    attacker.join()
    assert during == alone
    assert all(results[i] in ok for i, (_, _, ok) in enumerate(attacks)), results
    srv.assert_no_leaks()
