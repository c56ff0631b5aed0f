"""A catalogue of bad inputs (issue 6, item 4), one test each.

tests/api/test_errors.py already covers part of the issue's list; this file adds the rest (and
the OpenAI-route variants), so that together every item is tested. Each case checks the status,
the error type in the route's own protocol format, and that nothing is left in the engine.

Where each item of the issue's list is tested (A = tests/api/test_errors.py,
C = tests/api/test_caching.py, R = this file, S = test_security.py):
  malformed JSON A+R | wrong content-type R | missing model/max_tokens/messages A+R |
  wrong types A+R | empty messages A | first message from assistant where not allowed R |
  tool_result without tool_use A | unknown block type A | input_schema not an object A |
  tool_choice naming an unknown tool A+R | temperature out of range A+R | max_tokens <= 0 A+R |
  max_tokens over the limit A+R | prompt over the context A+R | 5 cache breakpoints C+R |
  bad ttl A+R | body over 32 MB R+S | unknown model A+R | missing / wrong API key A+R |
  unknown path A+R | GET on POST routes A+R | invalid UTF-8 A+R |
  extremely long single-token strings R | stop list too long / empty strings A+R | n > 1 A+R
"""
from __future__ import annotations

import json

import httpx
import pytest

from .conftest import (HEADERS, check_anthropic_error, check_openai_error, live_server,
                      tokenizer_with_template)

MSG = {"model": "tf-test", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
CHAT = {"model": "tf-test", "messages": [{"role": "user", "content": "hi"}]}
JSON = {"content-type": "application/json"}


def send(server, method, path, *, body=None, raw=None, headers=None):
    return httpx.request(method, server.base_url + path, timeout=60,
                         content=raw if raw is not None else json.dumps(body).encode(),
                         headers=JSON if headers is None else headers)


def check(path, r, status, etype, fragment=None):
    if path.startswith(("/v1/chat/completions", "/v1/completions")):
        msg = check_openai_error(r, status, etype)
    else:
        msg = check_anthropic_error(r, status, etype)
    if fragment is not None:
        assert fragment in msg, msg


INVALID = "invalid_request_error"
CASES = [
    # id, method, path, body, raw bytes, headers, status, error type, message fragment
    ("openai-malformed-json", "POST", "/v1/chat/completions", None, b'{"model": "tf-test",',
     None, 400, INVALID, "not valid JSON"),
    ("wrong-content-type-text", "POST", "/v1/messages", MSG, None,
     {"content-type": "text/plain"}, 400, INVALID, "content-type"),
    ("wrong-content-type-form", "POST", "/v1/messages/count_tokens", MSG, None,
     {"content-type": "application/x-www-form-urlencoded"}, 400, INVALID, "content-type"),
    ("openai-missing-content-type", "POST", "/v1/chat/completions", CHAT, None, {}, 400, INVALID,
     "content-type"),
    ("openai-missing-model", "POST", "/v1/chat/completions", {"messages": CHAT["messages"]}, None,
     None, 400, INVALID, "model"),
    ("openai-missing-messages", "POST", "/v1/chat/completions", {"model": "tf-test"}, None, None,
     400, INVALID, "messages"),
    ("completions-missing-prompt", "POST", "/v1/completions", {"model": "tf-test"}, None, None,
     400, INVALID, "prompt"),
    ("count-tokens-missing-messages", "POST", "/v1/messages/count_tokens", {"model": "tf-test"},
     None, None, 400, INVALID, "messages"),
    ("messages-not-a-list", "POST", "/v1/messages", {**MSG, "messages": "hi"}, None, None, 400,
     INVALID, "messages"),
    ("openai-max-tokens-wrong-type", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": "x"},
     None, None, 400, INVALID, "max_tokens"),
    ("role-unknown", "POST", "/v1/messages",
     {**MSG, "messages": [{"role": "tool", "content": "x"}]}, None, None, 400, INVALID, "role"),
    ("top-k-negative", "POST", "/v1/messages", {**MSG, "top_k": -1}, None, None, 400, INVALID,
     "top_k"),
    ("max-tokens-negative", "POST", "/v1/messages", {**MSG, "max_tokens": -5}, None, None, 400,
     INVALID, "max_tokens"),
    ("openai-max-tokens-zero", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 0}, None,
     None, 400, INVALID, "max_tokens"),
    ("openai-temperature-negative", "POST", "/v1/chat/completions", {**CHAT, "temperature": -0.1},
     None, None, 400, INVALID, "temperature"),
    ("tool-choice-tool-without-tools", "POST", "/v1/messages",
     {**MSG, "tool_choice": {"type": "tool", "name": "ghost"}}, None, None, 400, INVALID, "ghost"),
    ("openai-tool-choice-unknown-function", "POST", "/v1/chat/completions",
     {**CHAT, "tools": [{"type": "function", "function": {"name": "a"}}],
      "tool_choice": {"type": "function", "function": {"name": "zzz"}}}, None, None, 400,
     INVALID, "zzz"),
    ("five-breakpoints-across-system-and-messages", "POST", "/v1/messages",
     {**MSG, "system": [{"type": "text", "text": f"s{i}", "cache_control": {"type": "ephemeral"}}
                        for i in range(3)],
      "messages": [{"role": "user", "content": [
          {"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}},
          {"type": "text", "text": "b", "cache_control": {"type": "ephemeral"}}]}]},
     None, None, 400, INVALID, "Found 5"),
    ("ttl-1h-after-5m", "POST", "/v1/messages",
     {**MSG, "system": [{"type": "text", "text": "a",
                         "cache_control": {"type": "ephemeral", "ttl": "5m"}}],
      "messages": [{"role": "user", "content": [
          {"type": "text", "text": "b", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}]},
     None, None, 400, INVALID, "1h"),
    ("cache-control-bad-type", "POST", "/v1/messages",
     {**MSG, "cache_control": {"type": "forever"}}, None, None, 400, INVALID, "cache_control"),
    ("unknown-model-count-tokens", "POST", "/v1/messages/count_tokens",
     {**MSG, "model": "no-such-model"}, None, None, 404, "not_found_error", "no-such-model"),
    ("unknown-model-completions", "POST", "/v1/completions",
     {"model": "no-such-model", "prompt": "x"}, None, None, 404, "not_found_error",
     "no-such-model"),
    ("unknown-model-card", "GET", "/v1/models/no-such-model", None, b"", {}, 404,
     "not_found_error", "no-such-model"),
    ("unknown-path-openai-prefix", "POST", "/v1/chat/completions/extra", CHAT, None, None, 404,
     "not_found_error", None),
    ("unknown-path-root", "GET", "/v2/messages", None, b"", {}, 404, "not_found_error", None),
    ("get-on-chat-completions", "GET", "/v1/chat/completions", None, b"", {}, 405, INVALID, "GET"),
    ("get-on-count-tokens", "GET", "/v1/messages/count_tokens", None, b"", {}, 405, INVALID,
     "GET"),
    ("put-on-messages", "PUT", "/v1/messages", MSG, None, None, 405, INVALID, "PUT"),
    ("openai-invalid-utf8", "POST", "/v1/chat/completions", None,
     b'{"model":"tf-test","messages":[{"role":"user","content":"\xc3\x28"}]}', None, 400,
     INVALID, None),
    ("invalid-utf8-in-model-name", "POST", "/v1/messages", None,
     b'{"model":"tf\xff","max_tokens":4,"messages":[{"role":"user","content":"x"}]}', None, 400,
     INVALID, None),
    ("long-single-token-string", "POST", "/v1/messages",
     {**MSG, "messages": [{"role": "user", "content": "x" * 300_000}]}, None, None, 400, INVALID,
     "prompt is too long"),
    ("openai-long-single-token-string", "POST", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": "\u00e9" * 20_000}]}, None, None, 400,
     INVALID, "prompt is too long"),
    ("openai-too-many-stops", "POST", "/v1/chat/completions", {**CHAT, "stop": ["a"] * 50}, None,
     None, 400, INVALID, "stop"),
    ("openai-empty-stop", "POST", "/v1/chat/completions", {**CHAT, "stop": ""}, None, None, 400,
     INVALID, "stop"),
    ("openai-n-zero", "POST", "/v1/chat/completions", {**CHAT, "n": 0}, None, None, 400, INVALID,
     "n: Input should be greater than or equal to 1"),
    ("completions-n-too-many", "POST", "/v1/completions", {"model": "tf-test", "prompt": "x", "n": 17},
     None, None, 400, INVALID, "n: Input should be less than or equal to 16"),
    ("completions-token-ids-out-of-range", "POST", "/v1/completions",
     {"model": "tf-test", "prompt": [10**9, -1], "max_tokens": 3}, None, None, 400, INVALID,
     "prompt"),
    ("openai-tool-arguments-not-json", "POST", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "assistant", "content": None, "tool_calls": [
         {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{nope"}}]}]},
     None, None, 400, INVALID, "arguments"),
    ("tool-use-input-nested-too-deep", "POST", "/v1/messages", None,
     (b'{"model":"tf-test","max_tokens":4,"messages":[{"role":"user","content":"a"},'
      b'{"role":"assistant","content":[{"type":"tool_use","id":"t1","name":"f","input":{"x":'
      + b"[" * 900 + b"]" * 900 + b'}}]}]}'), None, 400, INVALID, "nested"),
    ("openai-arguments-nested-too-deep", "POST", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "assistant", "content": None, "tool_calls": [
         {"id": "c1", "type": "function", "function": {
             "name": "f", "arguments": "[" * 50_000 + "]" * 50_000}}]}]},
     None, None, 400, INVALID, "nested"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(server, case):
    _id, method, path, body, raw, headers, status, etype, fragment = case
    r = send(server, method, path, body=body, raw=raw, headers=headers)
    check(path, r, status, etype, fragment)
    server.assert_no_leaks()


def test_catalogue_is_large_enough():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


def test_max_tokens_over_the_limit_rejected_on_openai_route(tokenizer):
    with live_server(tokenizer, max_tokens_policy="reject") as srv:
        r = send(srv, "POST", "/v1/chat/completions", body={**CHAT, "max_tokens": 10**6})
        check("/v1/chat/completions", r, 400, INVALID, "1000000")
        r = send(srv, "POST", "/v1/completions",
                 body={"model": "tf-test", "prompt": "x", "max_tokens": 10**6})
        check("/v1/completions", r, 400, INVALID, "1000000")
        srv.assert_no_leaks()


def test_auth_missing_and_wrong_key_on_every_route(tokenizer):
    with live_server(tokenizer, api_keys={"right-key": "t"}) as srv:
        for method, path, body in [("POST", "/v1/messages/count_tokens", MSG),
                                   ("POST", "/v1/completions", {"model": "tf-test", "prompt": "x"}),
                                   ("GET", "/v1/models", None),
                                   ("GET", "/v1/models/tf-test", None)]:
            for hdrs in ({}, {"x-api-key": "wrong-key"}, {"authorization": "Bearer wrong-key"},
                         {"authorization": "Basic right-key"}):
                r = httpx.request(method, srv.base_url + path, json=body, timeout=30,
                                  headers=hdrs)
                check(path, r, 401, "authentication_error")
        # 401 comes before anything about the body: a malformed body with no key is a 401
        r = send(srv, "POST", "/v1/messages", raw=b"{not json")
        check("/v1/messages", r, 401, "authentication_error")
        srv.assert_no_leaks()


def test_body_over_32_mib_with_default_limit(server):
    """The default limit (32 MiB), chunked upload without content-length: 413, not a 400 or a
    parse of 33 MB (test_security covers the content-length path before any body byte)."""
    def chunks():
        piece = b"x" * (1 << 20)
        for _ in range(33):
            yield piece
    r = httpx.post(server.base_url + "/v1/messages", content=chunks(), headers=JSON, timeout=120)
    check("/v1/messages", r, 413, "request_too_large", "exceeds")
    r = httpx.post(server.base_url + "/v1/chat/completions", content=chunks(), headers=JSON,
                   timeout=120)
    check("/v1/chat/completions", r, 413, INVALID, "exceeds")
    server.assert_no_leaks()


STRICT_TEMPLATE = """{%- for m in messages -%}
{%- if loop.first and m.role == 'assistant' -%}
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{%- endif -%}
<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif -%}"""


def test_first_message_from_assistant_where_not_allowed(tokenizer, tmp_path):
    """The demo template accepts an assistant-first conversation (a prefill); a model whose
    chat template forbids it gets a 400 with the template's own message, never a 500."""
    strict = tokenizer_with_template(tokenizer, tmp_path, STRICT_TEMPLATE)
    with live_server(strict) as srv:
        convo = [{"role": "assistant", "content": "I start"}, {"role": "user", "content": "hi"}]
        r = send(srv, "POST", "/v1/messages", body={**MSG, "messages": convo})
        check("/v1/messages", r, 400, INVALID, "must alternate")
        r = send(srv, "POST", "/v1/messages/count_tokens", body={**MSG, "messages": convo})
        check("/v1/messages/count_tokens", r, 400, INVALID, "must alternate")
        r = send(srv, "POST", "/v1/chat/completions", body={**CHAT, "messages": convo})
        check("/v1/chat/completions", r, 400, INVALID, "must alternate")
        # user-first is fine with the same template
        r = send(srv, "POST", "/v1/messages", body=MSG)
        assert r.status_code == 200, r.text
        srv.assert_no_leaks()


def test_streaming_request_with_bad_input_fails_before_the_stream(server):
    """A bad streaming request is a plain JSON error, not a 200 stream with an error event."""
    with httpx.stream("POST", server.base_url + "/v1/messages", headers=HEADERS, timeout=30,
                      json={**MSG, "stream": True, "max_tokens": 0}) as r:
        r.read()
    check("/v1/messages", r, 400, INVALID, "max_tokens")
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", timeout=30,
                      json={**CHAT, "stream": True, "model": "nope"}) as r:
        r.read()
    check("/v1/chat/completions", r, 404, "not_found_error", "nope")
    server.assert_no_leaks()
