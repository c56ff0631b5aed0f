"""Security: keys, tenants, templates, file paths, CORS and the body limit."""
from __future__ import annotations

import inspect
import socket
import sys
import threading
from pathlib import Path

import httpx
import pytest

from .conftest import (HEADERS, ServeProcess, check_anthropic_error, check_openai_error,
                      live_server, tokenizer_with_template)

MSG = {"model": "tf-test", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


# ----------------------------------------------------------------------------- API keys
def test_keys_compared_in_constant_time_against_every_key(monkeypatch):
    from starlette.requests import Request

    import tokenfactory.api.auth as auth
    source = inspect.getsource(auth.Authenticator.tenant_for)
    assert "compare_digest" in source
    # no short-circuiting comparison of key material (the only == is the auth scheme's name)
    for line in source.splitlines():
        if "==" in line or ".get(given" in line or "given in " in line:
            assert "scheme" in line and "given" not in line and "presented" not in line, line
    calls = []
    real = auth.hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)
    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    a = auth.Authenticator({"k1": "A", "k2": "B", "k3": "C"})

    def req(key):
        return Request({"type": "http", "headers": [(b"x-api-key", key.encode())]})
    for key, tenant in [("k1", "A"), ("k3", "C")]:
        calls.clear()
        assert a.tenant_for(req(key)) == tenant
        assert len(calls) == 3          # the first key matching does not stop the loop
    calls.clear()
    with pytest.raises(auth.APIError):
        a.tenant_for(req("nope"))
    assert len(calls) == 3


@pytest.mark.slow
def test_api_keys_never_logged(tmp_path):
    secret, wrong = "sk-tf-SECRET-4242-abcdef", "sk-tf-WRONG-9999-zyxwvu"
    srv = ServeProcess(tmp_path, "--api-key", f"{secret}:alice", "--log-level", "debug")
    try:
        srv.wait_healthy()
        base = srv.base_url
        body = {"model": "tokenfactory-demo", "max_tokens": 2,
                "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(base + "/v1/messages", json=body, timeout=60,
                          headers={"x-api-key": secret}).status_code == 200
        assert httpx.post(base + "/v1/chat/completions", json=body, timeout=60,
                          headers={"authorization": f"Bearer {secret}"}).status_code == 200
        for hdrs in ({"x-api-key": wrong}, {"authorization": f"Bearer {wrong}"}):
            r = httpx.post(base + "/v1/messages", json=body, headers=hdrs, timeout=60)
            assert r.status_code == 401 and wrong not in r.text
        r = httpx.post(base + "/v1/messages", content=b"{bad", timeout=60,
                       headers={"x-api-key": secret, "content-type": "application/json"})
        assert r.status_code == 400 and secret not in r.text
        assert httpx.get(base + "/metrics").status_code == 403   # keys, no --metrics-key: off
    finally:
        code = srv.terminate()
        srv.close()
    log = srv.log()
    assert code == 0, log
    assert "alice" in log or "tenants" in log        # the log is really there
    for s in (secret, wrong, "SECRET-4242", "WRONG-9999"):
        assert s not in log, f"{s} leaked into the server log"


# ----------------------------------------------------------------------------- tenants
def test_tenants_are_salted_no_cross_tenant_cache_hit(tokenizer):
    prompt = "Shared system context. " * 40 + " [[reply:hello]]"   # several full KV pages
    with live_server(tokenizer, api_keys={"key-a": "tenant-a", "key-b": "tenant-b"}) as srv:
        ex = srv.executor

        def run(key, path="/v1/messages"):
            before = sum(ex.computed.values())
            if path == "/v1/messages":
                r = httpx.post(srv.base_url + path, headers={**HEADERS, "x-api-key": key},
                               json={**MSG, "messages": [{"role": "user", "content": prompt}]},
                               timeout=60)
                assert r.status_code == 200, r.text
                cached = r.json()["usage"]["cache_read_input_tokens"]
            else:
                r = httpx.post(srv.base_url + path, headers={"authorization": f"Bearer {key}"},
                               json={"model": "tf-test", "max_tokens": 8,
                                     "messages": [{"role": "user", "content": prompt}]},
                               timeout=60)
                assert r.status_code == 200, r.text
                cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
            srv.wait_idle()
            return cached, sum(ex.computed.values()) - before

        cold_cached, cold_work = run("key-a")
        assert cold_cached == 0 and cold_work > 3 * 16
        warm_cached, warm_work = run("key-a")
        assert warm_cached > 0 and warm_work == cold_work - warm_cached   # A hits its own cache
        # tenant B, byte-identical prompt: no cached token, and exactly a cold request's work
        # (a deterministic stand-in for "no timing-visible hit")
        b_cached, b_work = run("key-b")
        assert b_cached == 0 and b_work == cold_work
        # ... on the OpenAI route too (B's own pages now exist, so use a fresh tenant check:
        # A via OpenAI hits A's pages, B's second request hits only B's)
        a_oa_cached, _ = run("key-a", "/v1/chat/completions")
        b_cached2, b_work2 = run("key-b")
        assert b_cached2 == warm_cached and b_work2 == warm_work   # B now hits B's own pages
        assert a_oa_cached >= 0
        srv.assert_no_leaks()


def test_no_tenant_salt_means_shared_cache_control(tokenizer):
    """The control for the test above: without keys the same prompt *is* a hit."""
    prompt = "Shared system context. " * 40
    with live_server(tokenizer) as srv:
        body = {**MSG, "messages": [{"role": "user", "content": prompt}]}
        first = httpx.post(srv.base_url + "/v1/messages", json=body, timeout=60).json()
        second = httpx.post(srv.base_url + "/v1/messages", json=body, timeout=60).json()
        assert first["usage"]["cache_read_input_tokens"] == 0
        assert second["usage"]["cache_read_input_tokens"] > 0


# ----------------------------------------------------------------------------- templates
MALICIOUS_TEMPLATES = {
    "mro-subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "globals-os": "{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}",
    "lipsum-globals": "{{ lipsum.__globals__['os'].system('touch {marker}') }}",
    "mutate-messages": "{{ messages.append({{'role': 'x'}}) }}{{ messages }}",
    "namespace-dunder": "{% set ns = namespace(__class__=1) %}{{ ns }}",
    "format-string": "{{ '{{0.__class__}}'.format(messages) }}",
    "attr-filter": "{{ (messages|attr('__class__')) }}",
}


@pytest.mark.parametrize("name", list(MALICIOUS_TEMPLATES))
def test_chat_template_is_sandboxed(tokenizer, tmp_path, name):
    marker = tmp_path / "pwned"
    template = MALICIOUS_TEMPLATES[name].replace("{marker}", str(marker))
    if "{{'role'" in template:
        template = template.replace("{{'role': 'x'}}", "{'role': 'x'}")
    if "'{{0.__class__}}'" in template:
        template = template.replace("'{{0.__class__}}'", "'{0.__class__}'")
    evil = tokenizer_with_template(tokenizer, tmp_path, template)
    with live_server(evil) as srv:
        for path, body in [("/v1/messages", MSG),
                           ("/v1/chat/completions", {"model": "tf-test", "max_tokens": 4,
                                                     "messages": MSG["messages"]})]:
            r = httpx.post(srv.base_url + path, json=body, timeout=60)
            assert r.status_code != 200, r.text      # the template was refused
            assert r.status_code in (400, 500)
            if path == "/v1/messages":
                check_anthropic_error(r, r.status_code, "invalid_request_error"
                                      if r.status_code == 400 else "api_error")
            else:
                check_openai_error(r, r.status_code, "invalid_request_error"
                                   if r.status_code == 400 else "server_error")
            assert "<class" not in r.text and "subclasses" not in r.text.lower()
        srv.assert_no_leaks()
    assert not marker.exists(), "the template reached os"


# ----------------------------------------------------------------------------- file paths
_AUDIT = {"armed": False, "sentinel": "", "hits": []}
_FILE_EVENTS = ("open", "os.", "shutil.", "glob.", "subprocess.", "pathlib.", "tempfile.")


def _audit_hook(event, args):
    if _AUDIT["armed"] and event.startswith(_FILE_EVENTS):
        text = repr(args)
        if _AUDIT["sentinel"] in text:
            _AUDIT["hits"].append((event, text[:200]))


def test_no_request_field_is_used_as_a_file_path(tokenizer, tmp_path):
    """Every string field of the requests carries a path-like sentinel; an audit hook records
    every file-system operation (open, os.*, shutil.*, ...) whose arguments mention it."""
    s = str(tmp_path / "SENTINEL-no-file-here")
    _AUDIT["sentinel"] = "SENTINEL-no-file-here"
    if not getattr(sys, "_tf_audit_installed", False):
        sys.addaudithook(_audit_hook)       # audit hooks cannot be removed: gated by "armed"
        sys._tf_audit_installed = True
    tool = {"name": "t_SENTINEL-no-file-here", "description": s,
            "input_schema": {"type": "object", "$ref": "file://" + s,
                             "properties": {"p": {"type": "string", "default": s}}}}
    anthropic_bodies = [
        {**MSG, "model": s},
        {**MSG, "model": "../../../../" + s},
        {**MSG, "system": s, "metadata": {"user_id": s}, "stop_sequences": [s],
         "tools": [tool], "messages": [
             {"role": "user", "content": [{"type": "text", "text": s}]},
             {"role": "assistant", "content": [{"type": "tool_use", "id": s,
                                                "name": tool["name"], "input": {"path": s}}]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": s,
                                           "content": s}]}]},
        {**MSG, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "file://" + s}}]}]},
        {**MSG, "messages": [{"role": "user", "content": [
            {"type": "document", "source": {"type": "file", "file_id": s, "path": s}}]}]},
        {**MSG, "chat_template": s, "template": s, "model_dir": s, "tokenizer": s},
    ]
    openai_bodies = [
        {"model": s, "messages": [{"role": "user", "content": "x"}]},
        {"model": "tf-test", "max_tokens": 4, "user": s, "stop": [s],
         "messages": [{"role": "user", "content": s, "name": s}],
         "tools": [{"type": "function", "function": {"name": "f", "parameters": {
             "type": "object", "$ref": "file://" + s}}}]},
        {"model": "tf-test", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "file://" + s}}]}]},
        {"model": "tf-test", "max_tokens": 4, "chat_template": s, "response_format": {
            "type": "json_schema", "json_schema": {"$ref": "file://" + s}}},
    ]
    with live_server(tokenizer) as srv:
        # control: the hook does see a file operation on the sentinel path
        _AUDIT["armed"], _AUDIT["hits"] = True, []
        try:
            open(s)
        except OSError:
            pass
        assert _AUDIT["hits"], "audit hook not working"
        _AUDIT["hits"] = []
        try:
            for body in anthropic_bodies:
                for path in ("/v1/messages", "/v1/messages/count_tokens"):
                    r = httpx.post(srv.base_url + path, json=body, timeout=60,
                                   headers={"anthropic-beta": s})
                    assert r.status_code in (200, 400, 404), r.text
            for body in openai_bodies:
                r = httpx.post(srv.base_url + "/v1/chat/completions", json=body, timeout=60)
                assert r.status_code in (200, 400, 404), r.text
            r = httpx.post(srv.base_url + "/v1/completions", timeout=60,
                           json={"model": "tf-test", "prompt": s, "max_tokens": 2, "suffix": s})
            assert r.status_code in (200, 400), r.text
            assert httpx.get(srv.base_url + "/v1/models/" + s).status_code in (200, 404)
            assert httpx.get(srv.base_url + "/v1/models/..%2F..%2F" + s).status_code in (200, 404)
            srv.wait_idle()
        finally:
            _AUDIT["armed"] = False
        assert _AUDIT["hits"] == [], _AUDIT["hits"]
        srv.assert_no_leaks()


# ----------------------------------------------------------------------------- CORS
def test_cors_is_off_by_default(server):
    pre = httpx.options(server.base_url + "/v1/messages", headers={
        "origin": "https://evil.example", "access-control-request-method": "POST",
        "access-control-request-headers": "content-type,x-api-key"})
    assert not any(k.lower().startswith("access-control-") for k in pre.headers), pre.headers
    r = httpx.post(server.base_url + "/v1/messages", json=MSG,
                   headers={"origin": "https://evil.example"}, timeout=30)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_only_with_the_flag(tokenizer):
    with live_server(tokenizer, enable_cors=True) as srv:
        pre = httpx.options(srv.base_url + "/v1/messages", headers={
            "origin": "https://app.example", "access-control-request-method": "POST"})
        assert "access-control-allow-origin" in pre.headers


# ----------------------------------------------------------------------------- body limit
def _raw_request(base_url: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    """Send the headers and only ``body`` (not what content-length promises); read the reply."""
    host, port = base_url.removeprefix("http://").split(":")
    head = f"POST {path} HTTP/1.1\r\nhost: {host}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        sock.settimeout(30)                    # hang guard: the reply must come without the body
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.find(b"\r\n\r\n") + 4 + 10:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


@pytest.mark.parametrize("path,etype", [("/v1/messages", b"request_too_large"),
                                        ("/v1/chat/completions", b"invalid_request_error"),
                                        ("/v1/messages/count_tokens", b"request_too_large")])
def test_33mb_body_rejected_before_it_is_read(server, path, etype):
    """content-length says 33 MiB; we send 100 bytes of not-JSON and wait: the 413 arrives
    without the body ever being sent, so nothing was read, let alone parsed."""
    reply = _raw_request(server.base_url, path, {
        "content-type": "application/json", "content-length": str(33 * 2**20)}, b"{" * 100)
    status_line = reply.split(b"\r\n", 1)[0]
    assert b" 413 " in status_line, reply[:300]
    assert etype in reply
    server.assert_no_leaks()


def test_33mb_invalid_json_fully_sent_is_413_not_400(server):
    r = httpx.post(server.base_url + "/v1/messages", content=b"\xff{" * (33 * 2**19 + 10),
                   headers={"content-type": "application/json"}, timeout=120)
    check_anthropic_error(r, 413, "request_too_large")
    server.assert_no_leaks()


def test_auth_checked_before_the_body_is_read(tokenizer):
    with live_server(tokenizer, api_keys={"k": "t"}) as srv:
        reply = _raw_request(srv.base_url, "/v1/messages", {
            "content-type": "application/json", "content-length": str(10 * 2**20)}, b"{")
        assert b" 401 " in reply.split(b"\r\n", 1)[0] and b"authentication_error" in reply
