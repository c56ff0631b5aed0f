"""The front door under attack (issue 13, items 5 and 6): connection floods, trickled heads and
bodies, bodies sent to routes that take none, /metrics access, key handling.

Servers run in-process on loopback over the guarded h11 protocol (api/frontdoor.py) around a
scripted engine; one test starts the real ``tokenfactory serve`` to check the CLI wiring. Every
timeout here is a hang guard, never a performance threshold.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import select
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

from tokenfactory.api.frontdoor import ConnectionLimits, RepeatFilter, uvicorn_config
from tokenfactory.api.server import collect_unless_disconnected, create_app

from .conftest import (HEADERS, ServeProcess, check_anthropic_error, live_server, make_engine,
                       metric_value)

MSG = {"model": "tf-test", "max_tokens": 32, "messages": [{"role": "user", "content": "hi"}]}
GUARD_S = 30.0   # hang guard for every wait below


@contextmanager
def guarded_server(tokenizer, limits: ConnectionLimits, **app_options):
    """uvicorn over the guarded protocol in a thread, around a fresh scripted engine."""
    engine = make_engine(tokenizer, record_work=False)
    app = create_app(engine, tokenizer, served_model_name="tf-test", ping_interval=0.05,
                     **app_options)
    config = uvicorn_config(app, host="127.0.0.1", port=0, limits=limits, log_level="warning",
                            lifespan="on")
    app.state.ctx.metrics.attach_front_door(config.http)   # as serve_cli does
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + GUARD_S
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", config.http
    finally:
        server.should_exit = True
        thread.join(10)
        engine.shutdown()


def _connect(base_url: str) -> socket.socket:
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=GUARD_S)
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    """True when the server has closed ``sock`` (EOF or reset is readable without blocking)."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        sock.setblocking(False)
        data = sock.recv(65536)
        while data:
            data = sock.recv(65536)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (hang-guarded)."""
    sock.settimeout(GUARD_S)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def _head(method: str, path: str, headers: dict[str, str]) -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()


# ----------------------------------------------------------------------------- connections
def test_idle_connection_flood_keeps_health_answering(tokenizer):
    """200 idle sockets against a cap of 64: the oldest idle ones are closed to make room,
    /health answers throughout, and everything works once the flood is gone."""
    limits = ConnectionLimits(max_connections=64, header_timeout=120.0)
    with guarded_server(tokenizer, limits) as (base, protocol):
        flood = [_connect(base) for _ in range(200)]
        deadline = time.monotonic() + GUARD_S
        while len(protocol.live) > 64 or sum(map(_closed_by_server, flood)) < 200 - 64:
            assert time.monotonic() < deadline, f"{len(protocol.live)} connections open"
            time.sleep(0.05)
        for _ in range(3):   # fresh connections each time: each must get past the flood
            r = httpx.get(base + "/health", timeout=GUARD_S, headers={"connection": "close"})
            assert r.status_code == 200, r.text
        assert len(protocol.live) <= 64
        metrics = httpx.get(base + "/metrics", timeout=GUARD_S).text
        assert metric_value(metrics, "tokenfactory_connections_evicted_total") >= 200 - 64
        assert metric_value(metrics, "tokenfactory_connections_open") <= 64
        for s in flood:
            s.close()
        r = httpx.post(base + "/v1/messages", headers=HEADERS, json=MSG, timeout=GUARD_S)
        assert r.status_code == 200 and r.json()["stop_reason"] == "end_turn", r.text


def test_all_connections_busy_new_one_gets_503_then_recovers(tokenizer):
    limits = ConnectionLimits(max_connections=3, header_timeout=120.0)
    with guarded_server(tokenizer, limits) as (base, protocol):
        # three requests in progress: heads sent, bodies still owed
        busy = [_connect(base) for _ in range(3)]
        for s in busy:
            s.sendall(_head("POST", "/v1/messages", {"content-type": "application/json",
                                                     "content-length": "1000"}) + b"{")
        deadline = time.monotonic() + GUARD_S
        while len(protocol.live) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        extra = _connect(base)
        reply = _read_until_closed(extra)
        assert reply.startswith(b"HTTP/1.1 503 "), reply[:200]
        assert b"retry-after: 1" in reply.lower() and b"overloaded_error" in reply
        assert protocol.stats["refused"] == 1
        extra.close()
        busy[0].close()
        deadline = time.monotonic() + GUARD_S
        while len(protocol.live) > 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert httpx.get(base + "/health", timeout=GUARD_S).status_code == 200
        for s in busy[1:]:
            s.close()


# ----------------------------------------------------------------------------- timeouts
@pytest.fixture(scope="module")
def short_timeouts(tokenizer):
    limits = ConnectionLimits(max_connections=64, header_timeout=1.0)
    with guarded_server(tokenizer, limits, body_timeout=1.0) as (base, _):
        yield base


def test_trickled_head_is_closed_after_the_header_timeout(short_timeouts):
    sock = _connect(short_timeouts)
    sock.sendall(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n")
    t0 = time.monotonic()
    closed = False
    while not closed:   # a header line every 0.2 s: bytes keep flowing, the deadline holds
        assert time.monotonic() - t0 < GUARD_S, "trickled head held past the hang guard"
        try:
            sock.sendall(b"x-trickle: 1\r\n")
        except OSError:
            break
        time.sleep(0.2)
        closed = bool(select.select([sock], [], [], 0)[0])
    reply = _read_until_closed(sock)
    sock.close()
    assert reply == b"" or reply.startswith(b"HTTP/1.1 408 "), reply[:200]


def test_idle_connection_is_closed_after_the_header_timeout(short_timeouts):
    sock = _connect(short_timeouts)
    assert _read_until_closed(sock) == b""     # closed, silently, by the server
    sock.close()
    metrics = httpx.get(short_timeouts + "/metrics", timeout=GUARD_S).text
    assert metric_value(metrics, "tokenfactory_header_timeouts_total") >= 1


def test_next_head_on_a_kept_alive_connection_has_a_deadline_too(short_timeouts):
    sock = _connect(short_timeouts)
    sock.sendall(_head("GET", "/health", {}))
    sock.settimeout(GUARD_S)
    first = b""
    while not first.endswith(b'{"status":"ok"}'):
        chunk = sock.recv(65536)
        assert chunk, first
        first += chunk
    assert first.startswith(b"HTTP/1.1 200 "), first[:200]
    sock.sendall(b"GET /health HTTP/1.1\r\n")      # the next head, never finished
    reply = _read_until_closed(sock)
    sock.close()
    assert reply == b"" or reply.startswith(b"HTTP/1.1 408 "), reply[:200]


def test_trickled_body_gets_408(short_timeouts):
    sock = _connect(short_timeouts)
    sock.sendall(_head("POST", "/v1/messages", {"content-type": "application/json",
                                                 "content-length": "1000"}) + b'{"model"')
    reply = _read_until_closed(sock)
    sock.close()
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:300]
    assert b"did not arrive within 1 s" in reply
    metrics = httpx.get(short_timeouts + "/metrics", timeout=GUARD_S).text
    assert metric_value(metrics, "tokenfactory_body_timeouts_total") >= 1


# ----------------------------------------------------------------------------- bodies
@pytest.fixture(scope="module")
def guarded(tokenizer):
    with guarded_server(tokenizer, ConnectionLimits(header_timeout=60.0)) as (base, _):
        yield base


@pytest.mark.parametrize("method,path,status", [
    ("POST", "/health", 405), ("PUT", "/v1/messages", 405), ("POST", "/v1/models", 405),
    ("GET", "/v1/models", 200), ("POST", "/no/such/route", 404), ("PATCH", "/metrics", 405)])
def test_body_on_a_route_without_one_is_not_read(guarded, method, path, status):
    """content-length promises 31 MB, 100 bytes are sent: the answer comes without the rest."""
    sock = _connect(guarded)
    sock.sendall(_head(method, path, {"content-type": "application/json",
                                      "content-length": str(31 * 2**20)}) + b"x" * 100)
    sock.settimeout(GUARD_S)
    reply = sock.recv(65536)
    sock.close()
    assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply[:300]


def test_chunked_body_to_health_is_not_read(guarded):
    sock = _connect(guarded)
    sock.sendall(_head("POST", "/health", {"transfer-encoding": "chunked"}) + b"100000\r\n"
                 + b"y" * 1000)
    sock.settimeout(GUARD_S)
    reply = sock.recv(65536)
    sock.close()
    assert reply.startswith(b"HTTP/1.1 405 "), reply[:300]


def test_per_route_body_limit(tokenizer):
    with live_server(tokenizer, route_body_limits={"/v1/messages/count_tokens": 2000}) as srv:
        body = {**MSG, "messages": [{"role": "user", "content": "x" * 3000}]}
        r = httpx.post(srv.base_url + "/v1/messages/count_tokens", json=body, timeout=GUARD_S)
        check_anthropic_error(r, 413, "request_too_large")
        r = httpx.post(srv.base_url + "/v1/messages", json=body, headers=HEADERS,
                       timeout=GUARD_S)
        assert r.status_code == 200, r.text


def test_head_health(guarded):
    r = httpx.head(guarded + "/health", timeout=GUARD_S)
    assert r.status_code == 200 and r.content == b""


# ----------------------------------------------------------------------------- /metrics
@pytest.fixture(scope="module")
def keyed(tokenizer):
    with live_server(tokenizer, api_keys={"key-a": "A", "key-b": "B"},
                     metrics_key="scrape-me") as srv:
        yield srv.base_url


@pytest.mark.parametrize("headers,status", [
    ({}, 401), ({"x-api-key": "key-a"}, 403), ({"authorization": "Bearer key-b"}, 403),
    ({"x-api-key": "nope"}, 401), ({"x-api-key": "scrape-me"}, 200),
    ({"authorization": "Bearer scrape-me"}, 200)])
def test_metrics_need_the_metrics_key(keyed, headers, status):
    r = httpx.get(keyed + "/metrics", headers=headers, timeout=GUARD_S)
    assert r.status_code == status, r.text
    if status == 200:
        assert "tokenfactory_prompt_tokens_total" in r.text
    else:
        check_anthropic_error(r, status, {401: "authentication_error",
                                          403: "permission_error"}[status])
        assert "tokenfactory_" not in r.text


def test_metrics_off_with_keys_and_no_metrics_key(tokenizer):
    with live_server(tokenizer, api_keys={"key-a": "A"}) as srv:
        for headers in ({}, {"x-api-key": "key-a"}):
            r = httpx.get(srv.base_url + "/metrics", headers=headers, timeout=GUARD_S)
            check_anthropic_error(r, 403, "permission_error")
            assert "--metrics-key" in r.json()["error"]["message"]


def test_metrics_open_without_keys(guarded):
    r = httpx.get(guarded + "/metrics", timeout=GUARD_S)
    assert r.status_code == 200 and "tokenfactory_requests_running" in r.text


def test_health_open_and_empty_x_api_key_does_not_hide_bearer(keyed):
    assert httpx.get(keyed + "/health", timeout=GUARD_S).status_code == 200
    r = httpx.post(keyed + "/v1/messages", json=MSG, timeout=GUARD_S,
                   headers={**HEADERS, "x-api-key": "", "authorization": "Bearer key-a"})
    assert r.status_code == 200, r.text
    r = httpx.post(keyed + "/v1/messages", json=MSG, timeout=GUARD_S,
                   headers={**HEADERS, "x-api-key": ""})
    check_anthropic_error(r, 401, "authentication_error")


# ----------------------------------------------------------------------------- the CLI
@pytest.mark.slow
def test_cli_keys_from_file_and_env_metrics_key_and_connection_guards(tmp_path):
    file_key, env_key, metrics_key = "sk-file-7f3a9c", "sk-env-51be02", "sk-metrics-0c9d"
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# tenants\n{file_key}:alice\n\n")
    srv = ServeProcess(tmp_path, "--api-key-file", str(keys), "--header-timeout", "1",
                       "--max-connections", "32",
                       env={"TOKENFACTORY_API_KEYS": f"{env_key}:bob",
                            "TOKENFACTORY_METRICS_KEY": metrics_key})
    try:
        srv.wait_healthy()
        cmdline = open(f"/proc/{srv.proc.pid}/cmdline", "rb").read()
        for secret in (file_key, env_key, metrics_key):
            assert secret.encode() not in cmdline
        body = {"model": "tokenfactory-demo", "max_tokens": 2,
                "messages": [{"role": "user", "content": "hi"}]}
        for key in (file_key, env_key):
            r = httpx.post(srv.base_url + "/v1/messages", json=body, timeout=120,
                           headers={"x-api-key": key})
            assert r.status_code == 200, r.text
        r = httpx.post(srv.base_url + "/v1/messages", json=body, timeout=60,
                       headers={"x-api-key": "sk-unknown"})
        assert r.status_code == 401
        assert httpx.get(srv.base_url + "/metrics", timeout=60).status_code == 401
        assert httpx.get(srv.base_url + "/metrics", timeout=60,
                         headers={"x-api-key": file_key}).status_code == 403
        r = httpx.get(srv.base_url + "/metrics", timeout=60,
                      headers={"authorization": f"Bearer {metrics_key}"})
        assert r.status_code == 200 and "tokenfactory_connections_evicted_total" in r.text
        # the guarded protocol is in use: an idle connection is closed after the header timeout
        sock = _connect(srv.base_url)
        assert _read_until_closed(sock) == b""
        sock.close()
        # an attacker's repeated bad requests leave one log line per 10 s, not one each
        for _ in range(50):
            bad = _connect(srv.base_url)
            bad.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            assert _read_until_closed(bad).startswith(b"HTTP/1.1 400 ")
            bad.close()
        # the descriptor limit was raised to the hard limit
        limits = open(f"/proc/{srv.proc.pid}/limits").read()
        soft, hard = next(line for line in limits.splitlines()
                          if line.startswith("Max open files")).split()[3:5]
        assert soft == hard, limits
    finally:
        code = srv.terminate()
        srv.close()
    log = srv.log()
    assert code == 0, log
    assert "front door: at most 32 connections" in log
    assert 1 <= log.count("Invalid HTTP request received.") <= 2, log
    for secret in (file_key, env_key, metrics_key):
        assert secret not in log


# ----------------------------------------------------------------------------- housekeeping
def test_repeated_log_records_are_rate_limited():
    now = [0.0]
    flt = RepeatFilter(interval=10.0, clock=lambda: now[0])
    logger = logging.getLogger("tokenfactory.test.repeats")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)
    handler = Keep()
    logger.addHandler(handler)
    logger.addFilter(flt)
    logger.propagate = False
    try:
        for i in range(1000):
            try:
                raise OSError(24, "Too many open files")
            except OSError:
                logger.error("socket.accept() out of system resource\nsocket: %d", i,
                             exc_info=True)
        logger.warning("something else")
        assert [r.getMessage().split("\n")[0] for r in records] == [
            "socket.accept() out of system resource", "something else"]
        now[0] = 11.0
        try:
            raise OSError(24, "Too many open files")
        except OSError:
            logger.error("socket.accept() out of system resource\nsocket: %d", 0, exc_info=True)
        assert "999 similar messages suppressed" in records[-1].getMessage()
    finally:
        logger.removeHandler(handler)
        logger.removeFilter(flt)


def test_task_failing_during_disconnect_check_is_retrieved():
    """The client leaves while the collected task fails: no "Task exception was never
    retrieved" (asyncio reports it through the loop's exception handler at garbage collection)."""
    reported: list[dict] = []

    class LeavingRequest:
        async def is_disconnected(self):
            await asyncio.sleep(0.05)      # the task fails meanwhile
            return True

    async def fails():
        await asyncio.sleep(0.01)
        raise RuntimeError("engine said no")

    async def scenario():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: reported.append(ctx))
        with pytest.raises(Exception, match="client disconnected"):
            await collect_unless_disconnected(LeavingRequest(), fails(), poll_seconds=0.001)
        gc.collect()
        await asyncio.sleep(0)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(scenario())
        gc.collect()
    finally:
        loop.close()
    assert not [c for c in reported if "never retrieved" in c.get("message", "")], reported


def test_raise_fd_limit_reaches_the_hard_limit():
    import resource
    from tokenfactory.api.frontdoor import raise_fd_limit
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
        got = raise_fd_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == got
        assert got == (hard if hard != resource.RLIM_INFINITY else got) and got >= 256
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))



def test_connection_budget_fits_the_descriptor_limit():
    from tokenfactory.api.frontdoor import FD_RESERVE, connection_budget
    assert connection_budget(1024, 20000) == (1024, 256)
    for fd_limit in (256, 1024, 4096):
        cap, backlog = connection_budget(1024, fd_limit)
        assert 1 <= cap <= 1024 and cap + backlog <= fd_limit - FD_RESERVE, (fd_limit, cap)
