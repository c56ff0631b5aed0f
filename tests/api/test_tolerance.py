"""Issue 7: accept what Claude Code sends; aliases; max_tokens policy; moving breakpoints."""
from __future__ import annotations

import json

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .conftest import live_server
from .test_caching import long_system

CC_HEADERS = {"anthropic-version": "2023-06-01", "x-api-key": "k", "x-app": "cli",
              "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
              "anthropic-dangerous-direct-browser-access": "true",
              "X-Claude-Code-Session-Id": "abc", "X-Stainless-Lang": "js"}
TOOLS = [{"name": "Write", "description": "Write a file", "defer_loading": False,
          "input_schema": {"$schema": "https://json-schema.org/draft/2020-12/schema",
                           "type": "object", "additionalProperties": False,
                           "properties": {"file_path": {"type": "string"},
                                          "content": {"type": "string"},
                                          "n": {"type": "integer", "exclusiveMinimum": 0},
                                          "mode": {"enum": ["a", "b"]}},
                           "required": ["file_path", "content"]}}]
BILLING = "x-anthropic-billing-header: cc_version=2.1.329; cc_entrypoint=sdk-cli;"


def cc_body(billing=BILLING, extra_messages=(), last_cc="system"):
    cc = {"type": "ephemeral"}
    body = {
        "model": "claude-opus-5-5", "max_tokens": 128000, "stream": True,
        "thinking": {"type": "adaptive", "display": "omitted"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "medium"},
        "metadata": {"user_id": json.dumps({"device": "x", "session": "y"})},
        "tools": TOOLS,
        "system": [{"type": "text", "text": billing},
                   {"type": "text", "text": "You are Claude Code.", "cache_control": cc},
                   {"type": "text", "text": long_system("cc", 80), "cache_control": cc}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "<reminder>ctx</reminder>"},
                                         {"type": "text", "text": "Add dark mode. [[reply:tool_only]]"}]},
            {"role": "system", "content": [{"type": "text", "text": "Environment: linux",
                                            **({"cache_control": cc} if last_cc == "system"
                                               else {})}]},
            *extra_messages],
    }
    return body


def sse_usage(server, body, params="?beta=true"):
    with httpx.stream("POST", server.base_url + "/v1/messages" + params, json=body,
                      headers=CC_HEADERS, timeout=30) as r:
        assert r.status_code == 200, r.read()
        text = "".join(r.iter_text())
    frames = [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]
    start = frames[0]["message"]["usage"]
    return start, frames


def test_claude_code_request_is_accepted(server):
    usage, frames = sse_usage(server, cc_body())
    assert frames[-1]["type"] == "message_stop"
    tool = [f for f in frames if f["type"] == "content_block_start"][0]["content_block"]
    assert tool["type"] == "tool_use" and tool["name"] == "get_weather"
    server.assert_no_leaks()


def test_unknown_fields_everywhere_are_ignored(server):
    body = {"model": "tf-test", "max_tokens": 8, "brand_new_field": {"x": 1}, "service_tier": "auto",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "citations": None,
                                                       "weird": 1}], "extra": True}],
            "tool_choice": {"type": "auto", "disable_parallel_tool_use": True, "future": 1},
            "tools": [{"name": "t", "input_schema": {"type": "object"}, "unknown_key": [1]}]}
    r = httpx.post(server.base_url + "/v1/messages?beta=true&other=1", json=body, headers=CC_HEADERS)
    assert r.status_code == 200, r.text
    r = httpx.post(server.base_url + "/v1/messages/count_tokens?beta=true", json=body)
    assert r.status_code == 200 and r.json()["input_tokens"] > 0


def test_role_system_inside_messages_is_rendered(server):
    from tokenfactory.api.anthropic_prompt import PromptBuilder
    from tokenfactory.api.anthropic_models import MessagesRequest
    req = MessagesRequest.model_validate(cc_body())
    text, _, _ = PromptBuilder(server.app.state.ctx, req).render_full()
    assert "<|im_start|>system\nEnvironment: linux<|im_end|>" in text


def test_alias_matching(server):
    ok = httpx.post(server.base_url + "/v1/messages", json={
        "model": "claude-sonnet-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]})
    assert ok.status_code == 200 and ok.json()["model"] == "claude-sonnet-4-5"
    bad = httpx.post(server.base_url + "/v1/messages", json={
        "model": "gpt-4o", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]})
    assert bad.status_code == 404


def test_moving_breakpoint_reads_the_previous_turn(server):
    usage1, frames = sse_usage(server, cc_body())
    p1 = sum(usage1[k] for k in ("input_tokens", "cache_read_input_tokens",
                                 "cache_creation_input_tokens"))
    tool = [f for f in frames if f["type"] == "content_block_start"][0]["content_block"]
    turn2 = cc_body(last_cc="result", extra_messages=[
        {"role": "assistant", "content": [{**tool, "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool["id"],
                                      "content": "File written [[reply:final]]",
                                      "cache_control": {"type": "ephemeral"}}]}])
    usage2, _ = sse_usage(server, turn2)
    # everything turn 1 computed (whole pages) is read, though the markers moved
    assert usage2["cache_read_input_tokens"] >= ((p1 - 3) // 16) * 16
    assert usage2["cache_read_input_tokens"] >= 0.9 * p1


def test_rendering_of_earlier_turns_is_byte_stable(server):
    from tokenfactory.api.anthropic_prompt import PromptBuilder
    from tokenfactory.api.anthropic_models import MessagesRequest
    ctx = server.app.state.ctx
    t1 = PromptBuilder(ctx, MessagesRequest.model_validate(cc_body())).render_full()[0]
    t2 = PromptBuilder(ctx, MessagesRequest.model_validate(cc_body(last_cc="x", extra_messages=[
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Write",
                                           "input": {"file_path": "a", "content": "b"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": "ok"}]}]))).render_full()[0]
    gen_prompt = "<|im_start|>assistant\n"
    assert t1.endswith(gen_prompt) and t2.startswith(t1)


def test_strip_system_prefix(tokenizer):
    with live_server(tokenizer, aliases=[("claude-*", "tf-test")],
                     strip_system_prefix=r"^x-anthropic-billing-header:.*$") as srv:
        u1, _ = sse_usage(srv, cc_body(billing=BILLING))
        u2, _ = sse_usage(srv, cc_body(billing=BILLING.replace("2.1.329", "2.1.330")))
        assert u2["cache_read_input_tokens"] >= 0.9 * sum(
            u1[k] for k in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"))
    with live_server(tokenizer, aliases=[("claude-*", "tf-test")]) as srv:  # without: a miss
        sse_usage(srv, cc_body(billing=BILLING))
        u2, _ = sse_usage(srv, cc_body(billing=BILLING.replace("2.1.329", "2.1.330")))
        assert u2["cache_read_input_tokens"] < 64


def test_metrics_and_health(server):
    httpx.post(server.base_url + "/v1/messages", json={
        "model": "tf-test", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]})
    assert httpx.get(server.base_url + "/health").json() == {"status": "ok"}
    text = httpx.get(server.base_url + "/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("tokenfactory_time_to_first_token_seconds", "tokenfactory_inter_token_latency_seconds",
                 "tokenfactory_e2e_request_latency_seconds", "tokenfactory_requests_running",
                 "tokenfactory_requests_waiting", "tokenfactory_kv_pages_used",
                 "tokenfactory_kv_pages_total", "tokenfactory_prefix_cache_queries",
                 "tokenfactory_prefix_cache_hits", "tokenfactory_prompt_tokens",
                 "tokenfactory_cached_prompt_tokens", "tokenfactory_generation_tokens"):
        assert name in fams, name
    value = {s.name: s.value for f in fams.values() for s in f.samples}
    assert value["tokenfactory_kv_pages_total"] == server.core.kv.num_blocks
    assert value["tokenfactory_generation_tokens_total"] > 0
    assert value["tokenfactory_time_to_first_token_seconds_count"] > 0
    assert value["tokenfactory_prefix_cache_hits_total"] >= value["tokenfactory_cached_prompt_tokens_total"] > 0


def test_openapi_lists_every_endpoint(server):
    paths = httpx.get(server.base_url + "/openapi.json").json()["paths"]
    for p in ("/v1/messages", "/v1/messages/count_tokens", "/v1/chat/completions",
              "/v1/completions", "/v1/models", "/health", "/metrics"):
        assert p in paths
