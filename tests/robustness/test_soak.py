"""Soak with faults: hundreds of mixed requests, a fifth of the clients walking away mid-stream.

Afterwards nothing may be left behind (no KV page, no request in the scheduler) and every client
that stayed must have received a complete, well-formed response with the stop reason its
scenario implies.
"""
from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import httpx
import pytest

from .conftest import (HEADERS, WEATHER_TOOL, ServeProcess, anthropic_stream_text,
                      check_anthropic_stream, check_openai_stream, live_server, metric_value,
                      parse_sse)

SOAK_REQUESTS = 320
CONCURRENCY = 16
DISCONNECT_FRACTION = 0.2
SOAK_MODEL_LEN = 1024          # small, so "max_tokens near the limit" really meets the context
OPENAI_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters":
                                                  WEATHER_TOOL["input_schema"]}}


@dataclass
class Plan:
    i: int
    protocol: str      # "anthropic" | "openai"
    stream: bool
    scenario: str      # hello | stop | max | near_limit | tool | disconnect
    max_tokens: int
    cut_after: int = 0  # frames read before a disconnecting client leaves


def make_plans(n: int, seed: int = 6) -> list[Plan]:
    rng = random.Random(seed)
    plans = []
    for i in range(n):
        protocol = rng.choice(["anthropic", "openai"])
        if rng.random() < DISCONNECT_FRACTION:
            plans.append(Plan(i, protocol, True, "disconnect", 512, cut_after=rng.randint(0, 40)))
            continue
        scenario = rng.choices(["hello", "stop", "max", "near_limit", "tool"],
                               weights=[30, 25, 25, 5, 15])[0]
        max_tokens = {"max": rng.randint(1, 24), "near_limit": SOAK_MODEL_LEN - rng.randint(0, 3)
                      }.get(scenario, 256)
        plans.append(Plan(i, protocol, rng.random() < 0.7, scenario, max_tokens))
    return plans


async def disconnect_mid_stream(resp, cut_after: int, stats: dict) -> None:
    """Read ``cut_after`` lines of a stream, then stop (the caller leaves and drops the socket)."""
    n = 0
    async for _ in resp.aiter_lines():
        n += 1
        if n >= cut_after:
            break
    stats["disconnected"] += 1


def request_for(plan: Plan) -> tuple[str, dict]:
    reply = {"hello": "hello", "stop": "stop", "max": "long", "near_limit": "long",
             "tool": "tool", "disconnect": "long"}[plan.scenario]
    text = f"request {plan.i} [[reply:{reply}]]"
    if plan.protocol == "anthropic":
        body = {"model": "tf-test", "max_tokens": plan.max_tokens, "stream": plan.stream,
                "messages": [{"role": "user", "content": text}]}
        if plan.scenario == "stop":
            body["stop_sequences"] = ["STOP", "never-seen"]
        if plan.scenario == "tool":
            body["tools"] = [WEATHER_TOOL]
        return "/v1/messages", body
    body = {"model": "tf-test", "max_tokens": plan.max_tokens, "stream": plan.stream,
            "messages": [{"role": "user", "content": text}]}
    if plan.stream and plan.i % 2:
        body["stream_options"] = {"include_usage": True}
    if plan.scenario == "stop":
        body["stop"] = ["STOP"]
    if plan.scenario == "tool":
        body["tools"] = [OPENAI_TOOL]
    return "/v1/chat/completions", body


EXPECTED_ANTHROPIC = {"hello": {"end_turn"}, "stop": {"stop_sequence"}, "max": {"max_tokens"},
                      "near_limit": {"model_context_window_exceeded"}, "tool": {"tool_use"}}
EXPECTED_OPENAI = {"hello": {"stop"}, "stop": {"stop"}, "max": {"length"},
                   "near_limit": {"length"}, "tool": {"tool_calls"}}


def check_outcome(plan: Plan, status: int, headers, payload) -> None:
    """``payload``: parsed frames (stream) or the JSON body."""
    assert status == 200, (plan, payload)
    if plan.protocol == "anthropic":
        if plan.stream:
            delta = check_anthropic_stream(payload)
            stop_reason, stop_seq = delta["delta"]["stop_reason"], delta["delta"]["stop_sequence"]
            out_tokens = delta["usage"]["output_tokens"]
            text = anthropic_stream_text(payload)
        else:
            assert payload["type"] == "message" and payload["role"] == "assistant"
            assert payload["id"].startswith("msg_")
            stop_reason, stop_seq = payload["stop_reason"], payload["stop_sequence"]
            out_tokens = payload["usage"]["output_tokens"]
            text = "".join(b.get("text", "") for b in payload["content"])
        assert stop_reason in EXPECTED_ANTHROPIC[plan.scenario], (plan, stop_reason)
        if plan.scenario == "stop":
            assert stop_seq == "STOP" and text == "one two "
        if plan.scenario == "max":
            assert out_tokens == plan.max_tokens
        if plan.scenario == "near_limit":
            assert "x-tokenfactory-max-tokens-clamped" in headers
    else:
        if plan.stream:
            last = check_openai_stream(payload, include_usage=bool(plan.i % 2))
            finish = last["choices"][0]["finish_reason"]
            text = "".join((c["choices"][0]["delta"].get("content") or "")
                           for _, c in payload[:-1] if c["choices"])
        else:
            assert payload["object"] == "chat.completion"
            finish = payload["choices"][0]["finish_reason"]
            text = payload["choices"][0]["message"].get("content") or ""
            if plan.scenario == "max":
                assert payload["usage"]["completion_tokens"] == plan.max_tokens
        assert finish in EXPECTED_OPENAI[plan.scenario], (plan, finish)
        if plan.scenario == "stop":
            assert text == "one two "


async def run_one(client: httpx.AsyncClient, base_url: str, plan: Plan, stats: dict) -> None:
    path, body = request_for(plan)
    if not plan.stream:
        r = await client.post(base_url + path, json=body, headers=HEADERS)
        check_outcome(plan, r.status_code, r.headers, r.json())
        stats["completed"] += 1
        return
    async with client.stream("POST", base_url + path, json=body, headers=HEADERS) as resp:
        if plan.scenario == "disconnect":
            assert resp.status_code == 200
            await disconnect_mid_stream(resp, plan.cut_after, stats)
            return   # leaving the block closes the connection mid-stream
        text = "".join([chunk async for chunk in resp.aiter_text()])
        check_outcome(plan, resp.status_code, resp.headers, parse_sse(text))
        stats["completed"] += 1


async def soak(base_url: str, plans: list[Plan], concurrency: int) -> dict:
    stats = {"completed": 0, "disconnected": 0}
    queue: asyncio.Queue = asyncio.Queue()
    for p in plans:
        queue.put_nowait(p)
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def worker():
            while not queue.empty():
                await run_one(client, base_url, queue.get_nowait(), stats)
        await asyncio.gather(*[worker() for _ in range(concurrency)])
    return stats


def test_soak_scripted_engine_with_disconnects(tokenizer):
    plans = make_plans(SOAK_REQUESTS)
    assert {p.scenario for p in plans} == {"hello", "stop", "max", "near_limit", "tool",
                                           "disconnect"}
    assert {(p.protocol, p.stream) for p in plans} == {("anthropic", True), ("anthropic", False),
                                                       ("openai", True), ("openai", False)}
    with live_server(tokenizer, engine_kwargs={"model_len": SOAK_MODEL_LEN, "num_blocks": 1024,
                                               "max_num_seqs": 32}) as srv:
        stats = asyncio.run(soak(srv.base_url, plans, CONCURRENCY))
        n_disc = sum(p.scenario == "disconnect" for p in plans)
        assert stats == {"completed": len(plans) - n_disc, "disconnected": n_disc}
        assert n_disc >= 0.15 * len(plans)
        srv.assert_no_leaks()
        # the aborts really happened in the engine (not every stream simply ran to its end)
        text = httpx.get(srv.base_url + "/metrics").text
        assert metric_value(text, "tokenfactory_requests_running") == 0
        assert metric_value(text, "tokenfactory_kv_pages_used") == 0
        # and the server still answers normally afterwards
        r = httpx.post(srv.base_url + "/v1/messages", headers=HEADERS, json={
            "model": "tf-test", "max_tokens": 32, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["stop_reason"] == "end_turn"
        srv.assert_no_leaks()


@pytest.mark.slow
def test_soak_demo_model_subprocess(tmp_path):
    """The real built-in demo model (random weights) behind `tokenfactory serve`: 40 requests."""
    srv = ServeProcess(tmp_path, "--max-output-tokens", "16")
    try:
        srv.wait_healthy()
        rng = random.Random(7)
        plans = []
        for i in range(40):
            protocol = rng.choice(["anthropic", "openai"])
            stream = rng.random() < 0.7
            if stream and rng.random() < 0.3:
                plans.append(Plan(i, protocol, True, "disconnect", 16, cut_after=rng.randint(0, 8)))
            else:
                plans.append(Plan(i, protocol, stream, "demo", rng.randint(1, 16)))

        async def go():
            stats = {"completed": 0, "disconnected": 0}
            async with httpx.AsyncClient(timeout=120) as client:
                sem = asyncio.Semaphore(4)

                async def one(plan):
                    async with sem:
                        await run_demo(client, srv.base_url, plan, stats)
                await asyncio.gather(*[one(p) for p in plans])
            return stats
        stats = asyncio.run(go())
        n_disc = sum(p.scenario == "disconnect" for p in plans)
        assert stats == {"completed": 40 - n_disc, "disconnected": n_disc} and n_disc > 0
        # idle again: nothing running or waiting, every page back (the gauge counts pages in use
        # by requests; cached-but-free pages are reusable and not counted)
        for _ in range(100):
            m = httpx.get(srv.base_url + "/metrics").text
            if (metric_value(m, "tokenfactory_requests_running") == 0
                    and metric_value(m, "tokenfactory_kv_pages_used") == 0):
                break
            asyncio.run(asyncio.sleep(0.1))
        assert metric_value(m, "tokenfactory_requests_running") == 0
        assert metric_value(m, "tokenfactory_requests_waiting") == 0
        assert metric_value(m, "tokenfactory_kv_pages_used") == 0
        assert metric_value(m, "tokenfactory_engine_alive") == 1
    finally:
        code = srv.terminate()
        srv.close()
    assert code == 0, srv.log()
    assert "Traceback" not in srv.log(), srv.log()


async def run_demo(client, base_url, plan: Plan, stats) -> None:
    """Random weights: any text; the stop reason is max_tokens unless EOS came first."""
    path = "/v1/messages" if plan.protocol == "anthropic" else "/v1/chat/completions"
    body = {"model": "tokenfactory-demo", "max_tokens": plan.max_tokens, "stream": plan.stream,
            "messages": [{"role": "user", "content": f"Tell me a story, number {plan.i}."}]}
    if not plan.stream:
        r = await client.post(base_url + path, json=body, headers=HEADERS)
        assert r.status_code == 200, r.text
        data = r.json()
        if plan.protocol == "anthropic":
            assert data["stop_reason"] in ("max_tokens", "end_turn")
            assert 1 <= data["usage"]["output_tokens"] <= plan.max_tokens
        else:
            assert data["choices"][0]["finish_reason"] in ("length", "stop")
        stats["completed"] += 1
        return
    async with client.stream("POST", base_url + path, json=body, headers=HEADERS) as resp:
        assert resp.status_code == 200
        if plan.scenario == "disconnect":
            await disconnect_mid_stream(resp, plan.cut_after, stats)
            return
        frames = parse_sse("".join([c async for c in resp.aiter_text()]))
    if plan.protocol == "anthropic":
        delta = check_anthropic_stream(frames)
        assert delta["delta"]["stop_reason"] in ("max_tokens", "end_turn")
        assert 1 <= delta["usage"]["output_tokens"] <= plan.max_tokens
    else:
        check_openai_stream(frames)
    stats["completed"] += 1
