"""Every error in its protocol's format, with the right status and type, and no leaked pages."""
from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from .conftest import live_server

MSG = {"model": "tf-test", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


def post(server, path, body=None, *, content=None, headers=None):
    return httpx.post(server.base_url + path, json=body if content is None else None,
                      content=content, headers=headers, timeout=30)


def check_anthropic(r, status, etype):
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == etype
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert r.headers["request-id"].startswith("req_")
    return body["error"]["message"]


def check_openai(r, status, etype):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == etype and set(err) == {"message", "type", "param", "code"}
    return err["message"]


@pytest.mark.parametrize("body,content,fragment", [
    (None, b"{not json", "not valid JSON"),
    ({"model": "tf-test", "messages": [{"role": "user", "content": "x"}]}, None, "max_tokens"),
    ({"model": "tf-test", "max_tokens": 5}, None, "messages"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, None, "model"),
    ({**MSG, "messages": []}, None, "messages"),
    ({**MSG, "max_tokens": 0}, None, "max_tokens"),
    ({**MSG, "max_tokens": "lots"}, None, "max_tokens"),
    ({**MSG, "temperature": 1.5}, None, "temperature"),
    ({**MSG, "messages": [{"role": "user", "content": [{"type": "video", "x": 1}]}]}, None,
     "messages"),
    ({**MSG, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA"}}]}]},
     None, "does not accept image input"),
    ({**MSG, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "text", "data": "x"}}]}]}, None,
     "does not accept document input"),
    ({**MSG, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_nope", "content": "x"}]}]}, None,
     "toolu_nope"),
    ({**MSG, "tools": [{"name": "t", "input_schema": {"type": "string"}}]}, None, "object"),
    ({**MSG, "tools": [{"name": "t", "input_schema": {"type": "object"}}],
      "tool_choice": {"type": "tool", "name": "other"}}, None, "other"),
    ({**MSG, "stop_sequences": [""]}, None, "stop"),
    ({**MSG, "stop_sequences": ["s"] * 100}, None, "stop_sequences"),
    ({**MSG, "system": [{"type": "text", "text": "x",
                         "cache_control": {"type": "ephemeral", "ttl": "2h"}}]}, None, "ttl"),
])
def test_anthropic_bad_requests(server, body, content, fragment):
    headers = {"content-type": "application/json"}
    r = post(server, "/v1/messages", body, content=content, headers=headers)
    assert fragment in check_anthropic(r, 400, "invalid_request_error")
    server.assert_no_leaks()


def test_unknown_model_is_404(server):
    r = post(server, "/v1/messages", {**MSG, "model": "gpt-9"})
    assert "gpt-9" in check_anthropic(r, 404, "not_found_error")
    r = post(server, "/v1/chat/completions", {"model": "gpt-9", "messages": [
        {"role": "user", "content": "x"}]})
    check_openai(r, 404, "not_found_error")


def test_routes_and_methods(server):
    check_anthropic(httpx.get(server.base_url + "/v1/nothing"), 404, "not_found_error")
    check_anthropic(httpx.get(server.base_url + "/v1/messages"), 405, "invalid_request_error")


def test_openai_bad_requests(server):
    base = {"model": "tf-test", "messages": [{"role": "user", "content": "x"}]}
    check_openai(post(server, "/v1/chat/completions", {**base, "n": 17}), 400,
                 "invalid_request_error")
    check_openai(post(server, "/v1/chat/completions", {**base, "temperature": 3}), 400,
                 "invalid_request_error")
    check_openai(post(server, "/v1/chat/completions", content=b"[", headers={
        "content-type": "application/json"}), 400, "invalid_request_error")
    check_openai(post(server, "/v1/chat/completions", {"model": "tf-test", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
        400, "invalid_request_error")
    with pytest.raises(openai.BadRequestError):
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0) \
            .chat.completions.create(model="tf-test", messages=[], max_tokens=3)
    server.assert_no_leaks()


def test_context_overflow_reject_policy_and_clamp(tokenizer):
    with live_server(tokenizer, max_tokens_policy="reject") as srv:
        r = post(srv, "/v1/messages", {**MSG, "max_tokens": 100000})
        msg = check_anthropic(r, 400, "invalid_request_error")
        assert "100000" in msg and "8192" in msg
        srv.assert_no_leaks()
    with live_server(tokenizer, max_output_tokens=7) as srv:  # clamp (the default)
        r = post(srv, "/v1/messages", {**MSG, "max_tokens": 128000, "messages": [
            {"role": "user", "content": "[[reply:long]]"}]})
        assert r.status_code == 200
        assert r.headers["x-tokenfactory-max-tokens"] == "7"
        assert r.headers["x-tokenfactory-max-tokens-clamped"] == "128000->7"
        assert r.json()["usage"]["output_tokens"] == 7
        # the operator's cap, not the client's budget, ended the turn
        assert r.json()["stop_reason"] == "end_turn"
        r = post(srv, "/v1/messages", {**MSG, "max_tokens": 5, "messages": [
            {"role": "user", "content": "[[reply:long]]"}]})
        assert r.json()["stop_reason"] == "max_tokens"       # the client's own budget
    with live_server(tokenizer) as srv:                       # clamped by the context window
        r = post(srv, "/v1/messages", {**MSG, "max_tokens": 100000, "messages": [
            {"role": "user", "content": "[[reply:long]]" + " the" * 8150}]})
        assert r.status_code == 200 and "x-tokenfactory-max-tokens-clamped" in r.headers
        assert r.json()["stop_reason"] == "model_context_window_exceeded"
        srv.assert_no_leaks()


def test_prompt_longer_than_context(server):
    r = post(server, "/v1/messages", {**MSG, "messages": [
        {"role": "user", "content": "word " * 9000}]})
    assert "prompt is too long" in check_anthropic(r, 400, "invalid_request_error")
    server.assert_no_leaks()


def test_body_too_large(tokenizer):
    with live_server(tokenizer, max_body_bytes=100_000) as srv:
        big = {**MSG, "messages": [{"role": "user", "content": "x" * 200_000}]}
        check_anthropic(post(srv, "/v1/messages", big), 413, "request_too_large")
        # chunked upload without content-length is counted too
        def gen():
            for _ in range(30):
                yield b" " * 10_000
        r = httpx.post(srv.base_url + "/v1/messages", content=gen(), timeout=30,
                       headers={"content-type": "application/json"})
        check_anthropic(r, 413, "request_too_large")
        srv.assert_no_leaks()
    from tokenfactory.api.serving import ServerOptions
    assert ServerOptions().max_body_bytes == 32 * 1024 * 1024


def test_queue_full_is_529_and_429(tokenizer):
    with live_server(tokenizer, engine_kwargs={"max_queued_requests": 0}) as srv:
        r = post(srv, "/v1/messages", MSG)
        check_anthropic(r, 529, "overloaded_error")
        assert r.headers["retry-after"] == "1"
        r = post(srv, "/v1/messages", {**MSG, "stream": True})
        check_anthropic(r, 529, "overloaded_error")
        r = post(srv, "/v1/chat/completions", {"model": "tf-test", "messages": [
            {"role": "user", "content": "x"}]})
        check_openai(r, 429, "rate_limit_error")
        assert r.headers["retry-after"] == "1"
        srv.assert_no_leaks()


def test_auth(tokenizer):
    with live_server(tokenizer, api_keys={"sekrit": "t1"}) as srv:
        check_anthropic(post(srv, "/v1/messages", MSG), 401, "authentication_error")
        check_anthropic(post(srv, "/v1/messages", MSG, headers={"x-api-key": "wrong"}), 401,
                        "authentication_error")
        check_openai(post(srv, "/v1/chat/completions", {"model": "tf-test", "messages": []},
                          headers={"authorization": "Bearer nope"}), 401, "authentication_error")
        assert post(srv, "/v1/messages", MSG, headers={"x-api-key": "sekrit"}).status_code == 200
        assert post(srv, "/v1/messages", MSG,
                    headers={"authorization": "Bearer sekrit"}).status_code == 200
        assert httpx.get(srv.base_url + "/health").status_code == 200
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(base_url=srv.base_url, api_key="bad", max_retries=0) \
                .messages.create(**MSG)
        srv.assert_no_leaks()


def test_engine_failure_is_500_and_frees_pages(server):
    r = post(server, "/v1/messages", {**MSG, "messages": [
        {"role": "user", "content": "[[fail]] boom"}]})
    check_anthropic(r, 500, "api_error")
    server.assert_no_leaks()
    with httpx.stream("POST", server.base_url + "/v1/messages", json={
            **MSG, "stream": True, "messages": [{"role": "user", "content": "[[fail]] b"}]}) as resp:
        assert resp.status_code == 200
        text = "".join(resp.iter_text())
    assert "event: error" in text and '"api_error"' in text
    r = post(server, "/v1/chat/completions", {"model": "tf-test", "messages": [
        {"role": "user", "content": "[[fail]] c"}]})
    check_openai(r, 500, "server_error")
    server.assert_no_leaks()
    assert post(server, "/v1/messages", MSG).status_code == 200   # still serving others


@pytest.mark.parametrize("raw,status", [
    # a lone surrogate is not text (issue 13: 400 in the protocol's format, as the real API)
    (b'{"model":"tf-test","max_tokens":4,"messages":[{"role":"user","content":"\\ud800 x"}]}', 400),
    (b'{"model":"tf-test","max_tokens":4,"messages":[{"role":"user","content":"\xff\xfe"}]}', 400),
    (b'{"model":"tf-test","max_tokens":1e400,"messages":[{"role":"user","content":"x"}]}', 400),
    (b'{"model":"tf-test","max_tokens":4,"messages":[{"role":"user","content":[]}]}', 400),
    (b'{"model":"tf-test","max_tokens":4,"top_p":0,"messages":[{"role":"user","content":"x"}]}', 400),
    (b'{"model":"tf-test","max_tokens":99999999999999999999999,'
     b'"messages":[{"role":"user","content":"x"}]}', 200),   # clamped
])
def test_odd_inputs_never_500(server, raw, status):
    r = post(server, "/v1/messages", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    if status != 200:
        check_anthropic(r, status, "invalid_request_error")
    server.assert_no_leaks()


def test_engine_death_fails_requests_and_health(tokenizer):
    with live_server(tokenizer) as srv:
        assert post(srv, "/v1/messages", MSG).status_code == 200

        def broken_step():
            raise RuntimeError("engine thread crashed")
        srv.core.step = broken_step
        check_anthropic(post(srv, "/v1/messages", MSG), 500, "api_error")       # in flight
        r = httpx.get(srv.base_url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "unhealthy"
        check_anthropic(post(srv, "/v1/messages", MSG), 500, "api_error")       # new request
        check_openai(post(srv, "/v1/chat/completions", {"model": "tf-test", "messages": [
            {"role": "user", "content": "x"}]}), 500, "server_error")


def test_interleaved_streams(server):
    import asyncio

    async def one(client, i):
        async with client.messages.stream(model="tf-test", max_tokens=4, messages=[
                {"role": "user", "content": f"{i} [[slow]] [[reply:long]]"}]) as s:
            return await s.get_final_message()

    async def go():
        client = anthropic.AsyncAnthropic(base_url=server.base_url, api_key="x", max_retries=0)
        out = await asyncio.gather(*[one(client, i) for i in range(6)])
        await client.close()
        return out
    finals = asyncio.run(go())
    assert all(f.usage.output_tokens == 4 and f.content[0].text.startswith("word0") for f in finals)
    server.assert_no_leaks()
