"""Per-request station traces (api/trace.py): every station, spans that nest and add up to the
client-measured end-to-end time, /v1/trace/{id} behind the keys, OTLP export to a local
collector, and `tokenfactory trace` against a live server.

One server (scripted engine, ``[[slow]]`` prompts: 80 ms a pass, so a request lasts ~1 s and the
client's own connection overhead is well under the 5 % tolerance) serves every test here."""
from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

from tests.live import HEADERS, make_engine, parse_sse
from tokenfactory.api.server import create_app
from tokenfactory.api.trace import STATIONS, install_tracing

KEYS = {"key-alice": "alice", "key-bob": "bob"}
ADMIN = "metrics-admin"
# long enough that a second request over the same prefix hits the prefix cache (16-token pages)
PROMPT = "[[slow]] " + " ".join(f"fact {i} is about tracing." for i in range(12))


class Collector:
    """An OTLP/HTTP receiver on 127.0.0.1: parses each POST /v1/traces with opentelemetry-proto."""

    def __init__(self):
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest, ExportTraceServiceResponse)
        self.spans: list = []
        self.paths: list[str] = []
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                collector.paths.append(self.path)
                for rs in req.resource_spans:
                    for ss in rs.scope_spans:
                        collector.spans.extend(ss.spans)
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@contextmanager
def traced_server(tokenizer, otlp_endpoint):
    engine = make_engine(tokenizer)
    app = create_app(engine, tokenizer, served_model_name="tf-test", api_keys=KEYS,
                     metrics_key=ADMIN, ping_interval=30)
    tracer = install_tracing(app, app.state.ctx, otlp_endpoint=otlp_endpoint)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20   # hang guard
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", tracer
    finally:
        server.should_exit = True
        thread.join(10)
        engine.shutdown()
        if tracer.otel is not None:
            tracer.otel.shutdown()


@pytest.fixture(scope="module")
def collector():
    c = Collector()
    yield c
    c.httpd.shutdown()


@pytest.fixture(scope="module")
def traced(tokenizer, collector):
    with traced_server(tokenizer, collector.url) as (url, tracer):
        with httpx.Client(base_url=url, timeout=60) as client:
            client.get("/health")   # the connection is open before anything is timed
            yield url, tracer, client, run_requests(client)


CASES = [("anthropic", False), ("anthropic", True), ("openai", False), ("openai", True)]


def run_requests(client: httpx.Client) -> dict:
    """One request per (protocol, stream): its id, client-measured seconds, body and usage."""
    results = {}
    for proto, stream in CASES:
        if proto == "anthropic":
            path, body = "/v1/messages", {"model": "tf-test", "max_tokens": 32, "stream": stream,
                                          "messages": [{"role": "user", "content": PROMPT}]}
        else:
            path, body = "/v1/chat/completions", {
                "model": "tf-test", "max_tokens": 32, "stream": stream,
                "messages": [{"role": "user", "content": PROMPT}],
                "stream_options": {"include_usage": True} if stream else None}
        raw = json.dumps(body).encode()
        headers = {**HEADERS, "x-api-key": "key-alice"}
        t = time.monotonic()
        with client.stream("POST", path, content=raw, headers=headers) as resp:
            data = resp.read()
        seconds = time.monotonic() - t
        assert resp.status_code == 200, data
        text = data.decode()
        if stream:
            frames = [f for _, f in parse_sse(text) if f != "[DONE]"]
            if proto == "anthropic":
                start = frames[0]["message"]["usage"]
                usage = {"input": start["input_tokens"] + start["cache_read_input_tokens"]
                         + start["cache_creation_input_tokens"],
                         "output": frames[-2]["usage"]["output_tokens"]}
            else:
                u = frames[-1]["usage"]
                usage = {"input": u["prompt_tokens"], "output": u["completion_tokens"],
                         "cached": u["prompt_tokens_details"]["cached_tokens"]}
        else:
            doc = json.loads(text)
            if proto == "anthropic":
                u = doc["usage"]
                usage = {"input": u["input_tokens"] + u["cache_read_input_tokens"]
                         + u["cache_creation_input_tokens"], "output": u["output_tokens"]}
            else:
                u = doc["usage"]
                usage = {"input": u["prompt_tokens"], "output": u["completion_tokens"],
                         "cached": u["prompt_tokens_details"]["cached_tokens"]}
        results[(proto, stream)] = {"id": resp.headers["request-id"], "seconds": seconds,
                                    "bytes_in": len(raw), "bytes_out": len(data),
                                    "usage": usage}
    return results


def get_trace(client, rid, key=ADMIN):
    return client.get(f"/v1/trace/{rid}", headers={"x-api-key": key} if key else {})


@pytest.mark.parametrize("proto,stream", CASES)
def test_every_station_nests_and_adds_up(traced, proto, stream):
    _, _, client, results = traced
    r = results[(proto, stream)]
    resp = get_trace(client, r["id"])
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert doc["request_id"] == r["id"] and doc["stream"] is stream
    spans = {s["name"]: s for s in doc["spans"]}
    assert set(STATIONS) <= set(spans), set(STATIONS) - set(spans)
    root = doc["spans"][0]
    assert root["name"] == "request" and root["parent_id"] is None
    by_id = {s["span_id"]: s for s in doc["spans"]}
    eps = 1e-6
    for s in doc["spans"][1:]:
        assert s["start_s"] is not None and s["duration_s"] is not None, s
        parent = by_id[s["parent_id"]]
        assert parent["start_s"] - eps <= s["start_s"], (s, parent)
        assert s["start_s"] + s["duration_s"] <= parent["start_s"] + parent["duration_s"] + eps
    chunks = [s for s in doc["spans"] if s["name"] == "prefill_chunk"]
    assert chunks and all(by_id[c["parent_id"]]["name"] == "prefill" for c in chunks)
    # the stations' own times add up to the end-to-end time the client measured
    total_self = sum(s["self_s"] for s in doc["spans"] if s["self_s"] is not None)
    assert abs(root["duration_s"] - r["seconds"]) <= 0.05 * r["seconds"], (root, r)
    assert abs(total_self - r["seconds"]) <= 0.05 * r["seconds"], (total_self, r)
    # tokens and bytes against what the client saw
    assert spans["receive"]["bytes"] == r["bytes_in"]
    assert spans["stream_out"]["bytes"] == r["bytes_out"]
    assert spans["tokenize"]["tokens"] == r["usage"]["input"] == doc["prompt_tokens"]
    computed = sum(c["tokens"] for c in chunks)
    assert computed + spans["prefix_lookup"]["tokens"] == r["usage"]["input"]
    assert spans["decode"]["tokens"] == r["usage"]["output"] - 1   # the first comes with prefill
    assert spans["decode"]["attributes"]["steps"] == r["usage"]["output"] - 1
    assert spans["detokenize"]["tokens"] == r["usage"]["output"]
    assert spans["detokenize"]["attributes"]["calls"] >= r["usage"]["output"]
    assert spans["prefix_lookup"]["attributes"]["tier"] == "ram"
    if "cached" in r["usage"]:
        assert spans["prefix_lookup"]["tokens"] == r["usage"]["cached"]
    cost = doc["cost"]
    assert cost["prefill_machine_seconds"] > 0 and cost["decode_machine_seconds"] > 0
    assert cost["prefill_machine_seconds"] + cost["decode_machine_seconds"] == pytest.approx(
        cost["machine_seconds"], rel=1e-6)


def test_prefix_cache_hit_is_traced(traced):
    """The later requests repeat the first one's prompt: their lookups found its pages."""
    _, _, client, results = traced
    r = results[("openai", True)]
    doc = get_trace(client, r["id"]).json()
    assert doc["cached_tokens"] == r["usage"]["cached"] > 0
    cost = doc["cost"]
    assert cost["cache_saved_tokens"] == doc["cached_tokens"] == cost["cache_read_tokens"]
    # the list-price discount: reads at 0.1x of the default $3 per million input tokens
    assert cost["cache_saved_api_usd"] == pytest.approx(doc["cached_tokens"] * 3.0 * 0.9 / 1e6)


def test_trace_keys(traced):
    _, _, client, results = traced
    rid = results[("anthropic", False)]["id"]
    assert get_trace(client, rid, "key-alice").status_code == 200        # its own tenant
    other = get_trace(client, rid, "key-bob")
    assert other.status_code == 404 and other.json()["type"] == "error"  # as if it did not exist
    assert get_trace(client, rid, None).status_code == 401
    assert get_trace(client, rid, "wrong").status_code == 401
    assert get_trace(client, rid, ADMIN).status_code == 200             # the operator sees all
    msg_id = get_trace(client, rid).json()["response_id"]
    assert get_trace(client, msg_id, "key-alice").json()["request_id"] == rid
    assert get_trace(client, "req_nonexistent").status_code == 404


def test_otlp_export_reaches_the_collector(traced, collector):
    _, tracer, client, results = traced
    assert tracer.otel.flush()
    assert collector.paths and set(collector.paths) == {"/v1/traces"}
    rid = results[("openai", True)]["id"]
    roots = [s for s in collector.spans if s.name == "tokenfactory.request"
             and any(a.key == "tokenfactory.request_id" and a.value.string_value == rid
                     for a in s.attributes)]
    assert len(roots) == 1
    root = roots[0]
    mine = [s for s in collector.spans if s.trace_id == root.trace_id]
    names = {s.name for s in mine}
    assert {"tokenfactory." + n for n in STATIONS} | {"tokenfactory.prefill_chunk"} <= names
    by_id = {s.span_id: s for s in mine}
    for s in mine:
        if s is root:
            assert not s.parent_span_id
            continue
        parent = by_id[s.parent_span_id]
        want = "tokenfactory.prefill" if s.name == "tokenfactory.prefill_chunk" else root.name
        assert parent.name == want
        assert parent.start_time_unix_nano <= s.start_time_unix_nano
        assert s.end_time_unix_nano <= parent.end_time_unix_nano
    attrs = {a.key: a.value for s in mine if s.name == "tokenfactory.prefix_lookup"
             for a in s.attributes}
    assert attrs["tokenfactory.tier"].string_value == "ram"
    doc = get_trace(client, rid).json()
    assert attrs["tokenfactory.tokens"].int_value == doc["cached_tokens"]


def test_cli_prints_the_journey(traced):
    url, _, _, results = traced
    rid = results[("anthropic", True)]["id"]
    cmd = [sys.executable, "-m", "tokenfactory.cli", "trace", rid, "--url", url]
    out = subprocess.run(cmd + ["--api-key", "key-alice"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for station in STATIONS:
        assert any(line.split()[:1] == [station] for line in lines), (station, out.stdout)
    assert "prefill_chunk" in out.stdout and "cost" in out.stdout and "cache savings" in out.stdout
    denied = subprocess.run(cmd + ["--api-key", "key-bob"], capture_output=True, text=True,
                            timeout=120)
    assert denied.returncode == 1 and "404" in denied.stderr and "Traceback" not in denied.stderr


def test_otlp_endpoint_argument():
    """What --otlp-endpoint accepts (serve_cli's type=) and the URL it exports to."""
    import argparse
    from tokenfactory.api.trace_otel import otlp_endpoint_arg, traces_url
    assert traces_url("http://127.0.0.1:4318") == "http://127.0.0.1:4318/v1/traces"
    assert traces_url("https://c.example/otlp/v1/traces") == "https://c.example/otlp/v1/traces"
    with pytest.raises(argparse.ArgumentTypeError, match="http\\(s\\) URL"):
        otlp_endpoint_arg("localhost:4318")
