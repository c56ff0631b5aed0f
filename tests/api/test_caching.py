"""Anthropic prompt caching, exactly: breakpoints, block-rounded reads, TTLs, tenants."""
from __future__ import annotations

import anthropic
import httpx
import pytest

from .conftest import BLOCK_SIZE, live_server
from tokenfactory.api.caching import cache_usage
from tokenfactory.engine.request import CacheBreakpoint


def long_system(tag: str, n: int = 140) -> str:
    """About 16 tokens per rule: 140 rules are ~2.3K tokens."""
    return " ".join(f"Rule {i} of {tag}: keep the answer short and exact." for i in range(n))


def sys_block(text, ttl=None):
    cc = {"type": "ephemeral", **({"ttl": ttl} if ttl else {})}
    return [{"type": "text", "text": text, "cache_control": cc}]


def total(u) -> int:
    return u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens


def test_second_call_reads_the_block_rounded_prefix(anthropic_client, server):
    system = sys_block(long_system("read"))
    first = anthropic_client.messages.create(model="tf-test", max_tokens=8, system=system,
                                             messages=[{"role": "user", "content": "Alpha?"}])
    u1 = first.usage
    assert u1.cache_read_input_tokens == 0
    assert u1.cache_creation_input_tokens >= 2048
    assert u1.cache_creation_input_tokens % BLOCK_SIZE == 0
    assert u1.cache_creation.ephemeral_5m_input_tokens == u1.cache_creation_input_tokens
    assert u1.cache_creation.ephemeral_1h_input_tokens == 0
    count = anthropic_client.messages.count_tokens(
        model="tf-test", system=system, messages=[{"role": "user", "content": "Alpha?"}])
    assert total(u1) == count.input_tokens
    second = anthropic_client.messages.create(model="tf-test", max_tokens=8, system=system,
                                              messages=[{"role": "user", "content": "Zulu?"}])
    u2 = second.usage
    assert u2.cache_read_input_tokens == u1.cache_creation_input_tokens
    assert u2.cache_creation_input_tokens == 0
    assert u2.input_tokens == total(u2) - u2.cache_read_input_tokens
    server.assert_no_leaks()


def test_streamed_message_start_carries_cache_fields(anthropic_client, server):
    system = sys_block(long_system("stream"), ttl="1h")
    kw = dict(model="tf-test", max_tokens=8, system=system)
    anthropic_client.messages.create(messages=[{"role": "user", "content": "one"}], **kw)
    with anthropic_client.messages.stream(messages=[{"role": "user", "content": "two"}],
                                          **kw) as stream:
        events = list(stream)
    start = next(e for e in events if e.type == "message_start")
    assert start.message.usage.cache_read_input_tokens >= 2048
    assert start.message.usage.cache_creation_input_tokens == 0


def test_1h_then_5m_split(anthropic_client):
    a, b = long_system("split-a", 70), long_system("split-b", 70)
    msg = anthropic_client.messages.create(
        model="tf-test", max_tokens=8,
        system=[{"type": "text", "text": a, "cache_control": {"type": "ephemeral", "ttl": "1h"}},
                {"type": "text", "text": b, "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": "x"}])
    c = msg.usage.cache_creation
    assert c.ephemeral_1h_input_tokens >= 1024 and c.ephemeral_5m_input_tokens >= 1024
    assert msg.usage.cache_creation_input_tokens == (c.ephemeral_1h_input_tokens
                                                     + c.ephemeral_5m_input_tokens)


def test_below_minimum_nothing_is_written(anthropic_client):
    msg = anthropic_client.messages.create(
        model="tf-test", max_tokens=8, system=sys_block("short system prompt"),
        messages=[{"role": "user", "content": "x"}])
    assert msg.usage.cache_creation_input_tokens == 0


def test_five_breakpoints_is_the_exact_400(anthropic_client, server):
    blocks = [{"type": "text", "text": f"part {i}", "cache_control": {"type": "ephemeral"}}
              for i in range(5)]
    with pytest.raises(anthropic.BadRequestError) as info:
        anthropic_client.messages.create(model="tf-test", max_tokens=8, system=blocks,
                                         messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 400
    assert info.value.body["error"] == {
        "type": "invalid_request_error",
        "message": "A maximum of 4 blocks with cache_control may be provided. Found 5."}
    server.assert_no_leaks()


def test_1h_after_5m_is_rejected(anthropic_client):
    with pytest.raises(anthropic.BadRequestError):
        anthropic_client.messages.create(
            model="tf-test", max_tokens=8,
            system=[{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}},
                    {"type": "text", "text": "b",
                     "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
            messages=[{"role": "user", "content": "x"}])


def _pressure(server, num_tokens: int, offset: int) -> None:
    """A prompt of distinct token ids that needs fresh pages (evicts unpinned cached pages)."""
    ids = [100 + (offset + i) % 7000 for i in range(num_tokens)]
    r = httpx.post(server.base_url + "/v1/completions",
                   json={"model": "tf-test", "prompt": ids, "max_tokens": 1}, timeout=60)
    assert r.status_code == 200, r.text


def test_ttl_pins_survive_pressure_then_expire(tokenizer):
    with live_server(tokenizer) as server:
        _ttl_scenario(server, anthropic.Anthropic(base_url=server.base_url, api_key="x",
                                                  max_retries=0))


def _ttl_scenario(server, anthropic_client):
    system = sys_block(long_system("ttl"))
    kw = dict(model="tf-test", max_tokens=4, system=system)
    first = anthropic_client.messages.create(messages=[{"role": "user", "content": "a"}], **kw)
    written = first.usage.cache_creation_input_tokens
    assert written >= 2048
    server.wait_idle()
    stats = server.engine.stats()
    unpinned_free = stats.kv_blocks_free - stats.kv_blocks_pinned
    assert stats.kv_blocks_pinned >= written // BLOCK_SIZE
    _pressure(server, (unpinned_free - 1) * BLOCK_SIZE - 1, offset=0)   # every unpinned page
    again = anthropic_client.messages.create(messages=[{"role": "user", "content": "b"}], **kw)
    assert again.usage.cache_read_input_tokens == written    # pins held (and were refreshed)
    server.wait_idle()
    server.clock.advance(301)                                # past the 5-minute TTL
    _pressure(server, server.core.kv.num_blocks * BLOCK_SIZE - 2, offset=3000)  # all pages
    late = anthropic_client.messages.create(messages=[{"role": "user", "content": "c"}], **kw)
    assert late.usage.cache_read_input_tokens == 0
    assert late.usage.cache_creation_input_tokens == written
    server.assert_no_leaks()


def test_two_tenants_share_nothing(tokenizer):
    with live_server(tokenizer, api_keys={"key-a": "alice", "key-b": "bob"}) as srv:
        alice = anthropic.Anthropic(base_url=srv.base_url, api_key="key-a", max_retries=0)
        bob = anthropic.Anthropic(base_url=srv.base_url, auth_token="key-b", max_retries=0)
        kw = dict(model="tf-test", max_tokens=4, system=sys_block(long_system("tenant")),
                  messages=[{"role": "user", "content": "same"}])
        a1 = alice.messages.create(**kw)
        a2 = alice.messages.create(**kw)
        b1 = bob.messages.create(**kw)
        assert a1.usage.cache_read_input_tokens == 0
        assert a2.usage.cache_read_input_tokens >= a1.usage.cache_creation_input_tokens > 0
        assert b1.usage.cache_read_input_tokens == 0
        assert b1.usage.cache_creation_input_tokens == a1.usage.cache_creation_input_tokens
        srv.assert_no_leaks()


def test_usage_arithmetic_unit():
    bps = [CacheBreakpoint(1000, 3600.0), CacheBreakpoint(2100, 300.0)]
    u = cache_usage(2500, 0, bps, 16)
    assert (u.ephemeral_1h_input_tokens, u.ephemeral_5m_input_tokens) == (992, 2096 - 992)
    assert u.input_tokens + u.cache_creation_input_tokens + u.cache_read_input_tokens == 2500
    u = cache_usage(2500, 1008, bps, 16)      # read past the first breakpoint
    assert u.ephemeral_1h_input_tokens == 0 and u.cache_creation_input_tokens == 2096 - 1008
    u = cache_usage(2500, 2496, bps, 16)      # everything reusable was read
    assert u.cache_creation_input_tokens == 0 and u.input_tokens == 4
    assert cache_usage(100, 0, bps, 16, prefix_caching=False).input_tokens == 100
