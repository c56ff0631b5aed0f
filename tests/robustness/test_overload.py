"""Overload: a full queue answers 529 / 429 with retry-after at once, the admitted requests
still finish, the official SDKs' retries get through, and the server recovers afterwards."""
from __future__ import annotations

import threading
import time

import anthropic
import httpx
import openai

from .conftest import (HEADERS, check_anthropic_error, check_anthropic_stream, check_openai_error,
                      live_server, make_engine, metric_value, parse_sse)

BUSY = {"model": "tf-test", "max_tokens": 10, "stream": True,
        "messages": [{"role": "user", "content": "[[slow]] [[reply:long]]"}]}
QUICK = {"model": "tf-test", "max_tokens": 32, "messages": [{"role": "user", "content": "hi"}]}


def _wait_for(cond, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout     # hang guard
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def test_full_queue_rejects_then_sdks_retry_and_server_recovers(tokenizer):
    engine_kwargs = {"max_queued_requests": 2, "max_num_seqs": 1}
    with live_server(tokenizer, engine_kwargs=engine_kwargs) as srv:
        busy_results: list = []

        def busy(i):
            with httpx.stream("POST", srv.base_url + "/v1/messages", headers=HEADERS, timeout=60,
                              json={**BUSY, "messages": [{"role": "user", "content":
                                                          f"{i} [[slow]] [[reply:long]]"}]}) as r:
                busy_results.append((r.status_code, parse_sse(r.read().decode())))

        # one running (max_num_seqs=1) + two waiting = the queue is full
        threads = [threading.Thread(target=busy, args=(i,)) for i in range(3)]
        for i, t in enumerate(threads):
            t.start()
            _wait_for(lambda: srv.core.num_running + srv.engine.stats().num_waiting >= i + 1,
                      "busy request not admitted")
        _wait_for(lambda: srv.engine.stats().num_waiting >= 2, "queue did not fill")

        # new requests are refused at once, in each protocol's own way
        r = httpx.post(srv.base_url + "/v1/messages", headers=HEADERS, json=QUICK, timeout=10)
        check_anthropic_error(r, 529, "overloaded_error")
        assert r.headers["retry-after"] == "1"
        r = httpx.post(srv.base_url + "/v1/messages", headers=HEADERS,
                       json={**QUICK, "stream": True}, timeout=10)
        check_anthropic_error(r, 529, "overloaded_error")
        assert r.headers["retry-after"] == "1"
        r = httpx.post(srv.base_url + "/v1/chat/completions", timeout=10, json={
            "model": "tf-test", "messages": [{"role": "user", "content": "x"}]})
        check_openai_error(r, 429, "rate_limit_error")
        assert r.headers["retry-after"] == "1"
        r = httpx.post(srv.base_url + "/v1/completions", timeout=10, json={
            "model": "tf-test", "prompt": "x", "max_tokens": 3})
        check_openai_error(r, 429, "rate_limit_error")
        # the refused requests left nothing in the engine
        assert len(srv.core.scheduler.requests) <= 3

        # the SDKs, with retries on, get through once the queue drains
        statuses: dict[str, list[int]] = {"anthropic": [], "openai": []}
        answers: dict[str, str] = {}

        def hook(name):
            return lambda response: statuses[name].append(response.status_code)

        def sdk_http_client(name):
            # the SDKs bring their own httpx flavour; build the client from the module they use
            import anthropic._base_client as base
            return base.httpx2.Client(event_hooks={"response": [hook(name)]})

        def call_anthropic():
            client = anthropic.Anthropic(
                base_url=srv.base_url, api_key="x", max_retries=10,
                http_client=sdk_http_client("anthropic"))
            answers["anthropic"] = client.messages.create(**QUICK).stop_reason

        def call_openai():
            client = openai.OpenAI(
                base_url=srv.base_url + "/v1", api_key="x", max_retries=10,
                http_client=sdk_http_client("openai"))
            answers["openai"] = client.chat.completions.create(
                model="tf-test", max_tokens=32,
                messages=[{"role": "user", "content": "hi"}]).choices[0].finish_reason

        sdk_threads = [threading.Thread(target=call_anthropic), threading.Thread(target=call_openai)]
        for t in sdk_threads:
            t.start()
        for t in threads + sdk_threads:
            t.join(120)
            assert not t.is_alive()

        # the admitted requests all finished normally
        assert len(busy_results) == 3
        for status, frames in busy_results:
            assert status == 200
            assert check_anthropic_stream(frames)["delta"]["stop_reason"] == "max_tokens"
        # each SDK was refused at first and succeeded by retrying
        assert answers == {"anthropic": "end_turn", "openai": "stop"}, (answers, statuses)
        assert statuses["anthropic"][0] == 529 and statuses["anthropic"][-1] == 200, statuses
        assert statuses["openai"][0] == 429 and statuses["openai"][-1] == 200, statuses
        assert set(statuses["anthropic"][:-1]) == {529} and set(statuses["openai"][:-1]) == {429}

        # recovery: load gone, nothing leaked, ordinary requests are admitted straight away
        srv.assert_no_leaks()
        for _ in range(5):
            r = httpx.post(srv.base_url + "/v1/messages", headers=HEADERS, json=QUICK, timeout=10)
            assert r.status_code == 200 and r.json()["stop_reason"] == "end_turn"
        metrics = httpx.get(srv.base_url + "/metrics").text
        assert metric_value(metrics, "tokenfactory_requests_rejected_total") >= 6
        assert metric_value(metrics, "tokenfactory_requests_waiting") == 0
        srv.assert_no_leaks()


def test_queue_limit_counts_waiting_not_running(tokenizer):
    """With room in the queue, requests are admitted even while others run (no false 529s)."""
    with live_server(tokenizer, engine_kwargs={"max_queued_requests": 4}) as srv:
        results: list[int] = []

        def one(i):
            r = httpx.post(srv.base_url + "/v1/messages", headers=HEADERS, timeout=60, json={
                **QUICK, "messages": [{"role": "user", "content": f"{i} [[slow]]"}]})
            results.append(r.status_code)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [200] * 4
        srv.assert_no_leaks()


def test_one_tenant_flooding_cannot_starve_another(tokenizer):
    """Issue 13 item 4: tenant A retries at once on every 529 from six clients; tenant B, one
    client honouring retry-after, still gets its requests served. The door caps each tenant's
    share of the queue (--max-queued-requests-per-tenant) and the scheduler admits tenants
    round-robin."""
    from tokenfactory.engine.async_engine import AsyncEngine
    core = make_engine(tokenizer, max_num_seqs=1, record_work=False).core
    engine = AsyncEngine(core, max_queued_requests=4, max_queued_per_tenant=2)
    keys = {"key-a": "A", "key-b": "B"}
    with live_server(tokenizer, engine=engine, api_keys=keys) as srv:
        stop = threading.Event()
        a_status: list[int] = []

        def greedy(i):
            with httpx.Client(base_url=srv.base_url, timeout=60) as client:
                n = 0
                while not stop.is_set() and n < 2000:   # bounded
                    n += 1
                    r = client.post("/v1/messages", headers={**HEADERS, "x-api-key": "key-a"},
                                    json={**QUICK, "max_tokens": 4, "messages": [
                                        {"role": "user", "content": f"a{i}-{n} [[slow]]"}]})
                    a_status.append(r.status_code)
        flood = [threading.Thread(target=greedy, args=(i,)) for i in range(6)]
        for t in flood:
            t.start()
        _wait_for(lambda: a_status.count(529) >= 5, "A never filled its share")
        b_status: list[int] = []
        try:
            for j in range(3):
                for _ in range(30):   # bounded retries, each after retry-after
                    r = httpx.post(srv.base_url + "/v1/messages", timeout=60,
                                   headers={**HEADERS, "x-api-key": "key-b"},
                                   json={**QUICK, "messages": [
                                       {"role": "user", "content": f"b{j} [[slow]]"}]})
                    b_status.append(r.status_code)
                    if r.status_code == 200:
                        break
                    assert r.status_code == 529, r.text
                    time.sleep(float(r.headers["retry-after"]))
        finally:
            stop.set()
            for t in flood:
                t.join(120)
        assert b_status.count(200) == 3, b_status
        assert a_status.count(200) > 0 and a_status.count(529) > 0
        srv.assert_no_leaks()
