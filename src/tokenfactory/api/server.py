"""The HTTP front door: ``create_app(engine, tokenizer, ...)`` (``tokenfactory serve`` parses its
arguments and runs it: serve_cli.py).

The event loop only parses, renders templates, tokenizes and frames SSE; every forward pass runs
on the AsyncEngine's thread, so many streams interleave.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from tokenfactory.api import anthropic, openai, openai_completions
from tokenfactory.api.anthropic_models import CountTokensRequest, MessagesRequest
from tokenfactory.api.auth import Authenticator
from tokenfactory.api.dashboard import install_dashboard
from tokenfactory.api.errors import (AnthropicErrorBody, APIError, declared_errors, error_response,
                                     format_validation_errors, new_request_id)
from tokenfactory.api.gateway_metrics import register_gateway_metrics
from tokenfactory.api.memory import find_malloc_trim, set_trim_threshold, trim_periodically
from tokenfactory.api.metrics import Metrics
from tokenfactory.api.openai_models import ChatCompletionRequest, CompletionRequest
from tokenfactory.api.serving import ServerOptions, ServingContext
from tokenfactory.api.sse import collect_unless_disconnected  # noqa: F401 - re-exported
from tokenfactory.api.trace import install_tracing
from tokenfactory.engine.async_engine import AsyncEngine

log = logging.getLogger("tokenfactory.api")
# Open without a key: the liveness probe and the API's own description.
PUBLIC_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
# Server-wide views of every tenant's traffic: the operator's --metrics-key only (auth.py).
# (The dashboard's page and static files carry no data and are served by its own outer
# middleware before this one; what reaches here under /dashboard/ is its data.)
ADMIN_PATHS = frozenset({"/metrics", "/dashboard"})
ADMIN_PREFIXES = ("/dashboard/",)
# The only routes that take a request body; every other (method, path) is answered without
# reading one (a 31 MB POST to /health gets its 405 at once).
JSON_POST_ROUTES = ("/v1/messages", "/v1/messages/count_tokens", "/v1/chat/completions",
                    "/v1/completions")
DEFAULT_BODY_TIMEOUT = 60.0   # seconds for a whole request body to arrive


class FrontDoorMiddleware:
    """Runs before any parsing: request id, API key -> tenant (or the metrics key), and the
    body: read only on the routes that take one, within the route's size limit and within
    ``body_timeout`` seconds (a 408 and a closed connection otherwise)."""

    def __init__(self, app, *, auth: Authenticator, max_body_bytes: int,
                 body_timeout: float = DEFAULT_BODY_TIMEOUT,
                 route_body_limits: dict[str, int] | None = None, metrics: Metrics | None = None):
        self.app = app
        self.auth = auth
        self.metrics = metrics
        self.body_timeout = body_timeout
        self.limits = {route: max_body_bytes for route in JSON_POST_ROUTES}
        self.limits.update(route_body_limits or {})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        path = scope.get("path", "")

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"request-id" for k, _ in headers):
                    headers += [(b"request-id", rid.encode()), (b"x-request-id", rid.encode())]
                message = {**message, "headers": headers}
            await send(message)

        async def reject(status: int, msg: str, *, close: bool = False):
            resp = error_response(path, status, msg, request_id=rid,
                                  headers={"connection": "close"} if close else None)
            await resp(scope, receive, send)

        try:
            if path in ADMIN_PATHS or path.startswith(ADMIN_PREFIXES):
                self.auth.check_metrics_access(Request(scope))
            elif path not in PUBLIC_PATHS:
                state["tenant"] = self.auth.tenant_for(Request(scope))
        except APIError as exc:
            return await reject(exc.status, exc.message)
        limit = (self.limits.get(path.rstrip("/")) if scope["method"] == "POST" else None)
        if limit is None:
            # No body is read here: the app sees an empty one (uvicorn discards what the client
            # still sends, and its next request head is due within the header timeout).
            return await self.app(scope, _without_body(receive), send_with_id)
        too_large = f"request body exceeds the limit of {limit} bytes"
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    if int(v) > limit:
                        return await reject(413, too_large)
                except ValueError:
                    return await reject(400, "invalid content-length header")
        ctype = next((v.decode("latin-1") for k, v in scope.get("headers", [])
                      if k == b"content-type"), "")
        mime = ctype.split(";", 1)[0].strip().lower()
        if mime != "application/json" and not mime.endswith("+json"):
            return await reject(400, f"the request body must be JSON sent with content-type: "
                                     f"application/json (got {ctype or 'no content-type'!r})")
        chunks, total = [], 0
        deadline = asyncio.get_running_loop().time() + self.body_timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                if remaining <= 0:
                    raise TimeoutError
                message = await asyncio.wait_for(receive(), remaining)
            except (TimeoutError, asyncio.TimeoutError):
                if self.metrics is not None:
                    self.metrics.body_timeouts.inc()
                return await reject(408, f"the request body did not arrive within "
                                         f"{self.body_timeout:g} s", close=True)
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                return await reject(413, too_large)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send_with_id)


def _without_body(receive):
    """A ``receive`` whose first message is an empty, complete body; later calls (disconnect
    checks) go to the server."""
    given = False

    async def empty():
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return await receive()
    return empty


def create_app(engine: AsyncEngine, tokenizer, *, served_model_name: str = "tokenfactory",
               aliases: list[tuple[str, str]] | None = None,
               api_keys: dict[str, str] | None = None, metrics_key: str | None = None,
               body_timeout: float = DEFAULT_BODY_TIMEOUT,
               route_body_limits: dict[str, int] | None = None,
               otlp_endpoint: str | None = None, **options: Any) -> FastAPI:
    """A FastAPI app serving ``engine``. ``options`` are ServerOptions fields; ``metrics_key``
    guards /metrics, ``body_timeout`` bounds the time to receive a body, and
    ``route_body_limits`` (path -> bytes) overrides ``max_body_bytes`` per JSON route;
    ``otlp_endpoint`` exports each request's station trace (api/trace.py) to a collector."""
    opts = ServerOptions(served_model_name=served_model_name, aliases=list(aliases or []),
                         api_keys=dict(api_keys or {}), **options)
    metrics = Metrics(engine)
    ctx = ServingContext(engine, tokenizer, opts, metrics)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        if opts.malloc_trim_interval > 0 and opts.malloc_trim_threshold > 0:
            set_trim_threshold(opts.malloc_trim_threshold)
        trim = find_malloc_trim() if opts.malloc_trim_interval > 0 else None
        trimmer = (asyncio.ensure_future(trim_periodically(opts.malloc_trim_interval, trim,
                                                           lambda: ctx.activity))
                   if trim is not None else None)
        try:
            yield
        finally:
            if trimmer is not None:
                trimmer.cancel()
                with contextlib.suppress(BaseException):
                    await trimmer
            ctx.close()

    app = FastAPI(title="tokenfactory", version="0.1.0", lifespan=lifespan,
                  description="Anthropic Messages and OpenAI-compatible inference API")
    app.state.ctx = ctx
    app.state.auth = auth = Authenticator(opts.api_keys, metrics_key)
    app.add_middleware(FrontDoorMiddleware, auth=auth,
                       max_body_bytes=opts.max_body_bytes, body_timeout=body_timeout,
                       route_body_limits=route_body_limits, metrics=metrics)
    if opts.enable_cors:  # off by default (issue 6)
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"],
                           allow_headers=["*"])

    def rid(request: Request) -> str:
        return getattr(request.state, "request_id", None) or new_request_id()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(request.url.path, exc.status, exc.message, request_id=rid(request),
                              param=exc.param, code=exc.code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        msg, param = format_validation_errors(list(exc.errors()))
        return error_response(request.url.path, 400, msg, request_id=rid(request), param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        msg = {404: f"no route for {request.method} {request.url.path}",
               405: f"method {request.method} not allowed on {request.url.path}"}.get(
                   exc.status_code, str(exc.detail))
        return error_response(request.url.path, exc.status_code, msg, request_id=rid(request))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(request.url.path, 500, f"internal error: {type(exc).__name__}",
                              request_id=rid(request))

    # ------------------------------------------------------------------ routes
    # What /openapi.json declares is what the routes really answer (schemathesis checks it):
    # errors in each protocol's format (validation failures are 400, never FastAPI's 422),
    # and streams as text/event-stream.
    sse = {"text/event-stream": {"schema": {"type": "string"}}}
    post_errors = (400, 401, 404, 405, 413, 500)
    anthropic_stream = {200: {"content": sse, "description": "A message, or an SSE stream"},
                        **declared_errors(*post_errors, 529)}
    openai_stream = {200: {"content": sse, "description": "A completion, or an SSE stream"},
                     **declared_errors(*post_errors, 429, openai=True)}

    @app.post("/v1/messages", responses=anthropic_stream)
    async def messages(body: MessagesRequest, request: Request):
        return await anthropic.create_message(ctx, request, body,
                                              getattr(request.state, "tenant", None), rid(request))

    @app.post("/v1/messages/count_tokens", responses=declared_errors(*post_errors))
    async def messages_count_tokens(body: CountTokensRequest):
        return await anthropic.count_tokens(ctx, body)

    @app.post("/v1/chat/completions", responses=openai_stream)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await openai.create_chat_completion(ctx, request, body,
                                                   getattr(request.state, "tenant", None))

    @app.post("/v1/completions", responses=openai_stream)
    async def completions(body: CompletionRequest, request: Request):
        return await openai_completions.create_completion(ctx, request, body,
                                                          getattr(request.state, "tenant", None))

    def model_card(name: str, alias_of: str | None = None) -> dict:
        card = {"id": name, "object": "model", "type": "model", "created": created,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)),
                "owned_by": "tokenfactory", "display_name": name,
                "max_model_len": ctx.context_limit, "random_weights": opts.random_weights,
                "sampling_defaults": dict(opts.sampling_defaults),
                "chat_template_shows_tools": ctx.template_shows_tools}
        if alias_of:
            card["alias_of"] = alias_of
        if opts.random_weights:
            card["description"] = ("built-in demo model with RANDOM weights: its output is "
                                   "gibberish; pass --model DIR to serve a real model")
        return card

    @app.get("/v1/models", responses=declared_errors(401, 405, 500))
    async def list_models():
        data = [model_card(opts.served_model_name)]
        data += [model_card(p, alias_of=t) for p, t in opts.aliases]
        return {"object": "list", "data": data, "has_more": False,
                "first_id": data[0]["id"], "last_id": data[-1]["id"]}

    @app.get("/v1/models/{model_id:path}", responses=declared_errors(400, 401, 404, 405, 500))
    async def get_model(model_id: str):
        return model_card(model_id, alias_of=None if model_id == opts.served_model_name
                          else ctx.resolve_model(model_id))

    @app.head("/health", include_in_schema=False)   # load balancers probe with HEAD too
    @app.get("/health", responses={503: {"description": "The engine thread has died (or, "
                                                      "with replicas, every replica is down)"}})
    async def health():
        if not engine.is_alive:
            return JSONResponse({"status": "unhealthy", "error": str(engine.dead_error)},
                                status_code=503)
        if hasattr(engine, "health"):   # replicas behind the router: ok or degraded
            return engine.health()
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse, responses={
        **declared_errors(401, 405, 500),
        403: {"model": AnthropicErrorBody, "description": "A tenant key (metrics need the "
              "--metrics-key key), or metrics are off: keys are configured without one"}})
    async def prom_metrics():
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def openapi_without_422() -> dict:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            comps = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                comps.pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema
    app.openapi = openapi_without_422

    # operator views: vLLM-named metrics for inference gateways, and the live dashboard
    register_gateway_metrics(metrics, engine, opts.served_model_name)
    install_dashboard(app, ctx, metrics, authorize=auth.check_metrics_access)
    # per-request station traces (/v1/trace/{id}; OpenTelemetry export when an endpoint is set)
    install_tracing(app, ctx, otlp_endpoint=otlp_endpoint)
    return app
