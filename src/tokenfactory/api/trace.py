"""Per-request station traces (issue 21, part 2): where one request spent its time.

``install_tracing(app, ctx, otlp_endpoint=None)`` (once, before the app serves) adds

* an outermost ASGI middleware that opens a ``RequestTrace`` for every generation request
  (``/v1/messages``, ``/v1/chat/completions``, ``/v1/completions``) when its first message
  reaches the app, counts the bytes received and sent, notes the first and last response byte,
  and closes the trace when the last byte has gone;
* ``GET /v1/trace/{id}``: the trace as JSON, looked up by the ``request-id`` response header
  (or the response's own id, ``msg_...`` / ``chatcmpl-...``). A tenant key sees its own
  requests' traces only (another tenant's is a 404, as if it did not exist); the operator's
  metrics key sees every trace; without keys configured, traces are open like the API;
* a step listener on ``engine.core`` (``add_step_listener``, registered after the cost
  ledger's): each forward pass that carries a traced request adds a prefill chunk or a
  decode step to its trace, with the pass's time and the request's token share of it;
* with ``otlp_endpoint``, each finished trace exported as OpenTelemetry spans over OTLP/HTTP
  (protobuf), from a background thread (the SDK's batch processor).

Stations, in the order a request meets them (times on one monotonic clock)::

    receive      first ASGI message -> the handler runs (body read, JSON parsed, validated)
    tokenize     handler -> prompt ids (chat template + tokenizer; cheap rejections included)
    route        prompt ids -> submitted to the engine (one replica today: replica 0 of 1)
    queue        submitted -> the first forward pass that carries the request
    prefix_lookup  at admission: prompt tokens found in the prefix cache (tier "ram")
    prefill      first pass -> end of the pass that computed its last prompt token;
                 one ``prefill_chunk`` child per pass (tokens, seconds)
    decode       end of prefill -> end of the request's last pass (steps, tokens, busy time)
    detokenize   the engine's incremental detokenizer calls for this request (summed time)
    stream_out   first response byte -> last response byte (bytes, frames)

Each station has its wall-clock ``start_s`` / ``duration_s`` and its ``self_s``: the part of the
end-to-end time only it accounts for (a critical path). The self times add up to the root's
duration: when streaming, ``stream_out`` runs during decode, so its self time is only what
the client waited for after the engine's last output arrived; ``decode``'s self time excludes
detokenizing. The ``share`` printed by ``tokenfactory trace`` is ``self_s / total``.

Engine-internal times come without touching engine code: the step hook sees every pass (its
duration and each request's tokens, before the engine updates them), and detokenizing is timed
by wrapping the request's own ``IncrementalDetokenizer`` instance the first time a pass carries
it (before any token of it is detokenized). The prefix lookup itself is not timed (it runs
inside the scheduler's admission, which has no hook): its span has zero duration and carries
the hit tokens.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from fastapi import FastAPI
from starlette.requests import Request

from tokenfactory.api.errors import APIError, error_response, new_request_id

log = logging.getLogger("tokenfactory.api.trace")

TRACED_ROUTES = frozenset({"/v1/messages", "/v1/chat/completions", "/v1/completions"})
TRACE_PREFIX = "/v1/trace/"
DEFAULT_MAX_TRACES = 1000
STATIONS = ("receive", "tokenize", "route", "queue", "prefix_lookup", "prefill", "decode",
            "detokenize", "stream_out")


@dataclass
class _Step:
    """One forward pass that carried the request's prompt tokens (engine thread)."""
    end: float              # monotonic time the pass ended (when the hook ran)
    seconds: float          # the pass's duration
    tokens: int             # this request's prompt tokens in it
    share: float            # this request's machine seconds: seconds * tokens / all tokens


@dataclass
class _Decode:
    """Decode passes, aggregated: a long output must not cost one record per token."""
    steps: int = 0
    tokens: int = 0
    busy: float = 0.0       # the passes' durations, summed
    share: float = 0.0      # this request's machine seconds in them
    end: float | None = None


@dataclass
class RequestTrace:
    """Marks and counters of one request; ``to_dict`` turns them into spans."""
    route: str
    t_receive: float
    start_unix: float
    request_id: str | None = None
    response_id: str | None = None     # the engine's id (msg_..., chatcmpl-..., cmpl-...)
    tenant: str | None = None
    stream: bool | None = None
    status: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    frames_out: int = 0
    t_handler: float | None = None
    t_tokenized: float | None = None
    t_submit: float | None = None
    t_first_output: float | None = None
    t_last_output: float | None = None
    t_first_byte: float | None = None
    t_first_body_byte: float | None = None
    t_last_byte: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    output_bytes: int = 0
    outputs: int = 0
    finish_reason: str | None = None
    prefill: list[_Step] = field(default_factory=list)   # one per pass with prompt tokens
    decode: _Decode = field(default_factory=_Decode)
    t_first_pass: float | None = None   # start of the first pass that carried it
    detok_seconds: float = 0.0
    detok_calls: int = 0
    t_detok_first: float | None = None
    cost: Any = None                   # economics.ledger.RequestCost
    t_done: float | None = None        # the middleware let go of the request
    tracer: "Tracer | None" = field(default=None, repr=False)

    # ------------------------------------------------------------ marks (event loop)
    def mark_handler(self) -> None:
        if self.t_handler is None:
            self.t_handler = time.monotonic()

    def mark_tokenized(self, num_tokens: int) -> None:
        self.mark_handler()
        self.t_tokenized = time.monotonic()
        self.prompt_tokens = num_tokens

    def mark_submitted(self, engine_request_id: str) -> None:
        """Just before the request goes to the engine: from now on its passes are recorded."""
        if self.t_tokenized is None:
            self.mark_tokenized(self.prompt_tokens)
        self.t_submit = time.monotonic()
        self.response_id = engine_request_id
        if self.tracer is not None:
            self.tracer.live[engine_request_id] = self

    def mark_output(self, out) -> None:
        """Every engine output as it reaches the event loop (before any merging)."""
        now = time.monotonic()
        if self.t_first_output is None:
            self.t_first_output = now
            self.cached_tokens = max(out.num_cached_tokens, 0)
        self.t_last_output = now
        self.outputs += 1
        comp = out.outputs[0]
        self.output_tokens = len(comp.token_ids)
        if out.finished:
            self.finish_reason = comp.finish_reason
            self.output_bytes = len(comp.text.encode("utf-8", "surrogatepass"))

    def mark_done(self, cost) -> None:
        """The generation closed (finished, failed or abandoned); ``cost`` is its ledger bill."""
        if cost is not None:
            self.cost = cost
        if self.tracer is not None and self.response_id is not None:
            self.tracer.live.pop(self.response_id, None)

    # ------------------------------------------------------------ engine thread
    def _wrap_detokenizer(self, det) -> None:
        """Time this request's detokenizer calls (an instance attribute: nothing else changes)."""
        if det is None or getattr(det, "_tf_traced", False):
            return
        trace = self

        def timed(fn):
            def call(*args, **kwargs):
                if trace.t_detok_first is None:
                    trace.t_detok_first = time.monotonic()
                t = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    trace.detok_seconds += time.perf_counter() - t
                    trace.detok_calls += 1
            return call
        det.update = timed(det.update)
        det.flush = timed(det.flush)
        det._tf_traced = True

    # ------------------------------------------------------------ the spans
    def to_dict(self) -> dict:
        """Built on demand (a stored trace keeps only its marks and counters: small)."""
        t0 = self.t_receive
        end = self.t_last_byte or self.t_last_output or self.t_done or time.monotonic()
        total = end - t0
        spans: list[dict] = []

        def off(t: float | None) -> float | None:
            return None if t is None else t - t0

        def add(name: str, start: float | None, stop: float | None, self_s: float | None, *,
                parent: int = 0, tokens: int | None = None, nbytes: int | None = None,
                **attrs) -> int:
            sid = len(spans)
            spans.append({"span_id": sid, "parent_id": parent if sid else None, "name": name,
                          "start_s": off(start),
                          "duration_s": None if start is None or stop is None
                          else max(0.0, stop - start),
                          "self_s": None if self_s is None else max(0.0, self_s),
                          "tokens": tokens, "bytes": nbytes, "attributes": attrs})
            return sid

        add("request", t0, end, None, route=self.route, stream=self.stream, status=self.status)
        add("receive", t0, self.t_handler, _d(t0, self.t_handler), nbytes=self.bytes_in)
        add("tokenize", self.t_handler, self.t_tokenized, _d(self.t_handler, self.t_tokenized),
            tokens=self.prompt_tokens)
        add("route", self.t_tokenized, self.t_submit, _d(self.t_tokenized, self.t_submit),
            replica=0, replicas=1)
        prefill, decode = list(self.prefill), self.decode
        t_sched = self.t_first_pass
        add("queue", self.t_submit, t_sched, _d(self.t_submit, t_sched))
        add("prefix_lookup", t_sched, t_sched, 0.0 if t_sched is not None else None,
            tokens=self.cached_tokens, tier="ram", hit_tokens=self.cached_tokens,
            prompt_tokens=self.prompt_tokens)
        t_prefill_end = prefill[-1].end if prefill else t_sched
        pid = add("prefill", t_sched, t_prefill_end, _d(t_sched, t_prefill_end),
                  tokens=sum(s.tokens for s in prefill), chunks=len(prefill),
                  busy_s=sum(s.seconds for s in prefill))
        for i, s in enumerate(prefill):
            add("prefill_chunk", s.end - s.seconds, s.end, None, parent=pid,
                tokens=s.tokens, index=i)
        t_last_step = decode.end or t_prefill_end
        decode_self = _d(t_prefill_end, t_last_step)
        if decode_self is not None:
            decode_self -= self.detok_seconds
        add("decode", t_prefill_end, t_last_step, decode_self,
            tokens=decode.tokens, steps=decode.steps, busy_s=decode.busy)
        handoff = _d(t_last_step, self.t_last_output) or 0.0
        detok_start = self.t_detok_first
        add("detokenize", detok_start,
            None if detok_start is None else detok_start + self.detok_seconds,
            self.detok_seconds + handoff, tokens=self.output_tokens, nbytes=self.output_bytes,
            calls=self.detok_calls, handoff_s=handoff)
        add("stream_out", self.t_first_byte, self.t_last_byte,
            _d(self.t_last_output or t_last_step, self.t_last_byte), nbytes=self.bytes_out,
            frames=self.frames_out, first_body_byte_s=off(self.t_first_body_byte))
        return {"request_id": self.request_id, "response_id": self.response_id,
                "route": self.route, "stream": self.stream, "status": self.status,
                "start_unix": self.start_unix, "duration_s": total,
                "prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                "output_tokens": self.output_tokens, "finish_reason": self.finish_reason,
                "spans": spans, "cost": self._cost(prefill, decode)}

    def _cost(self, prefill: list[_Step], decode: _Decode) -> dict | None:
        """The ledger's bill split by phase, with what the prefix cache saved.

        The savings are the cached tokens and their discount at the API list prices (what the
        usage says). No machine-time figure is given for them: a pass's time is far from
        linear in its tokens (on the default model a 7-token chunk took 80 ms, a 64-token one
        286 ms), so one extrapolated from this request's own prefill would mislead by
        several times."""
        tracer = self.tracer
        if tracer is None:
            return None
        ledger = tracer.ledger
        per_s = ledger.cost_per_hour / 3600.0
        pre = sum(s.share for s in prefill)
        dec = decode.share
        doc: dict[str, Any] = {
            "prefill_machine_seconds": pre, "prefill_usd": pre * per_s,
            "decode_machine_seconds": dec, "decode_usd": dec * per_s,
            "cache_saved_tokens": self.cached_tokens, "cost_per_hour": ledger.cost_per_hour}
        if self.cost is not None:
            c = self.cost
            read = c.usage.cache_read_tokens
            prices = ledger.prices
            doc.update({
                "machine_seconds": c.machine_seconds, "usd": c.dollars, "joules": c.joules,
                "api_usd": c.api_dollars, "cache_read_tokens": read,
                "cache_saved_api_usd": read * prices.input_per_million
                * (1.0 - prices.cache_read_multiplier) / 1e6})
        return doc


def _d(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def trace_of(request: Request) -> RequestTrace | None:
    """The request's trace (None when tracing is not installed), its handler mark set."""
    tr = getattr(request.state, "trace", None)
    if tr is not None:
        tr.mark_handler()
    return tr


class TraceStore:
    """The last ``max_traces`` finished traces, by request id and by response id."""

    def __init__(self, max_traces: int = DEFAULT_MAX_TRACES):
        self.max_traces = max_traces
        self._lock = threading.Lock()
        self._traces: OrderedDict[str, RequestTrace] = OrderedDict()
        self._aliases: dict[str, str] = {}

    def add(self, trace: RequestTrace) -> None:
        with self._lock:
            self._traces[trace.request_id] = trace
            if trace.response_id:
                self._aliases[trace.response_id] = trace.request_id
            while len(self._traces) > self.max_traces:
                _, old = self._traces.popitem(last=False)
                self._aliases.pop(old.response_id or "", None)

    def get(self, key: str) -> RequestTrace | None:
        with self._lock:
            return self._traces.get(self._aliases.get(key, key))

    def __len__(self) -> int:
        return len(self._traces)


class Tracer:
    """The app's traces: the store, the live (in-engine) ones, the hook, the exporter."""

    def __init__(self, ctx, *, max_traces: int = DEFAULT_MAX_TRACES,
                 otlp_endpoint: str | None = None, exporter=None):
        self.ctx = ctx
        self.ledger = ctx.ledger
        self.store = TraceStore(max_traces)
        self.live: dict[str, RequestTrace] = {}   # engine request id -> trace
        self.core = ctx.engine.core
        self._hook_failed = False
        self.core.add_step_listener(self._on_step)   # after the ledger's (serving.py)
        self.otel = None
        if otlp_endpoint or exporter is not None:
            from tokenfactory.api.trace_otel import OtelExport
            self.otel = OtelExport(otlp_endpoint, exporter=exporter)

    def _on_step(self, seconds: float, tokens_by_request: dict[str, int]) -> None:
        if self._hook_failed or not self.live:
            return
        try:
            self._record(seconds, tokens_by_request)
        except Exception:  # noqa: BLE001 - a tracing bug must never stop the engine
            self._hook_failed = True
            log.exception("trace step recording failed; engine-side spans disabled")

    def _record(self, seconds: float, tokens_by_request: dict[str, int]) -> None:
        # Called after the pass and before the engine updates its requests (num_computed_tokens
        # still counts the tokens before this pass), as the ledger's hook is.
        now = time.monotonic()
        total = sum(tokens_by_request.values())
        requests = self.core.scheduler.requests
        for rid, n in tokens_by_request.items():
            trace = self.live.get(rid)
            req = requests.get(rid)
            if trace is None or req is None:
                continue
            if trace.t_first_pass is None:
                trace.t_first_pass = now - seconds
                trace._wrap_detokenizer(req.detokenizer)
            share = seconds * n / total if total else 0.0
            done = req.num_computed_tokens
            if done < req.num_prompt_tokens:   # (a preempted request recomputes: prefill again)
                trace.prefill.append(_Step(now, seconds, min(n, req.num_prompt_tokens - done),
                                           share))
            else:
                d = trace.decode
                d.steps += 1
                d.tokens += n
                d.busy += seconds
                d.share += share
                d.end = now

    def open(self, route: str) -> RequestTrace:
        return RequestTrace(route=route, t_receive=time.monotonic(), start_unix=time.time(),
                            tracer=self)

    def finish(self, trace: RequestTrace) -> None:
        trace.t_done = time.monotonic()
        trace.mark_done(None)
        if trace.t_submit is None:   # refused before the engine saw it: nothing to trace
            return
        self.store.add(trace)
        if self.otel is not None:
            try:
                self.otel.export(trace.to_dict())
            except Exception:  # noqa: BLE001 - export trouble never fails a request
                log.exception("OTLP export of trace %s failed", trace.request_id)

    def lookup(self, key: str, tenant: str | None, admin: bool) -> dict:
        trace = self.store.get(key)
        if trace is None or (not admin and trace.tenant != tenant):
            raise APIError(404, f"no trace for request '{key}' (traces of the last "
                                f"{self.store.max_traces} requests are kept)")
        return trace.to_dict()


class _TraceDoor:
    """Outermost middleware: opens and closes traces, answers GET /v1/trace/{id}."""

    def __init__(self, app, *, tracer: Tracer, auth_of: Callable[[], Any]):
        self.app = app
        self.tracer = tracer
        self.auth_of = auth_of

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path.startswith(TRACE_PREFIX):
            return await self._serve(scope, receive, send, path)
        if scope.get("method") != "POST" or path.rstrip("/") not in TRACED_ROUTES:
            return await self.app(scope, receive, send)
        trace = self.tracer.open(path.rstrip("/"))
        state = scope.setdefault("state", {})
        state["trace"] = trace

        async def counting_receive():
            message = await receive()
            if message["type"] == "http.request":
                trace.bytes_in += len(message.get("body", b""))
            return message

        async def timing_send(message):
            if message["type"] == "http.response.start":
                trace.t_first_byte = time.monotonic()
                trace.status = message.get("status")
                for k, v in message.get("headers", []):
                    if k.lower() == b"content-type":
                        trace.stream = v.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                if body:
                    trace.bytes_out += len(body)
                    trace.frames_out += 1
                    if trace.t_first_body_byte is None:
                        trace.t_first_body_byte = time.monotonic()
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                trace.t_last_byte = time.monotonic()   # handed to the server's transport
            await send(message)

        try:
            await self.app(scope, counting_receive, timing_send)
        finally:
            trace.request_id = state.get("request_id") or new_request_id()
            trace.tenant = state.get("tenant")
            self.tracer.finish(trace)

    async def _serve(self, scope, receive, send, path: str) -> None:
        request = Request(scope, receive)
        rid = new_request_id()
        try:
            if scope.get("method") not in ("GET", "HEAD"):
                raise APIError(405, f"method {scope.get('method')} not allowed on {path}")
            tenant, admin = self._who(request)
            key = path[len(TRACE_PREFIX):]
            if not key or "/" in key:
                raise APIError(404, f"no route for GET {path}")
            from fastapi.responses import JSONResponse
            resp = JSONResponse(self.tracer.lookup(key, tenant, admin),
                                headers={"request-id": rid, "cache-control": "no-store"})
        except APIError as exc:
            resp = error_response(path, exc.status, exc.message, request_id=rid,
                                  headers=exc.headers)
        await resp(scope, receive, send)

    def _who(self, request: Request) -> tuple[str | None, bool]:
        """(tenant, admin): the metrics key (or no keys at all) sees every trace; an API key
        sees its tenant's. Raises the front door's 401 otherwise."""
        auth = self.auth_of()
        if auth is None:
            return None, True
        try:
            auth.check_metrics_access(request)
            return None, True
        except APIError:
            pass
        return auth.tenant_for(request), False


def install_tracing(app: FastAPI, ctx, otlp_endpoint: str | None = None, *,
                    max_traces: int = DEFAULT_MAX_TRACES, exporter=None) -> Tracer:
    """Trace every generation request of ``app`` (call before it serves; idempotent).
    ``otlp_endpoint``: an OTLP/HTTP traces URL (``http://host:4318/v1/traces``; a bare
    ``http://host:4318`` gets ``/v1/traces`` appended) to export each finished trace to;
    ``exporter``: an OpenTelemetry ``SpanExporter`` instead (tests). Called again on the same
    app, it returns the installed tracer (adding the exporter if it had none)."""
    existing = getattr(app.state, "tracer", None)
    if existing is not None:   # hooks and middleware stay single; an exporter may be added
        if existing.otel is None and (otlp_endpoint or exporter is not None):
            from tokenfactory.api.trace_otel import OtelExport
            existing.otel = OtelExport(otlp_endpoint, exporter=exporter)
        return existing
    tracer = Tracer(ctx, max_traces=max_traces, otlp_endpoint=otlp_endpoint, exporter=exporter)
    app.state.tracer = tracer
    ctx.tracer = tracer
    app.add_middleware(_TraceDoor, tracer=tracer,
                       auth_of=lambda: getattr(app.state, "auth", None))
    return tracer
