"""A live dashboard at ``/dashboard``: the factory floor at a glance (issue 21, part 1).

``install_dashboard(app, ctx, metrics, authorize=...)`` adds

* ``GET /dashboard`` and ``GET /dashboard/static/{file}``: the page, its script and the vendored
  uPlot charting library (MIT, ``static/uPlot.LICENSE``). They carry no data and are served
  without a key: a browser cannot attach ``x-api-key`` to a page load; the page asks for it.
* ``GET /dashboard/data[?since=T]``: a JSON snapshot polled by the page (every second). It is
  server-wide data (every tenant's traffic), so ``authorize`` should be the front door's
  ``Authenticator.check_metrics_access``: with keys configured it needs the operator's metrics
  key (401 without or with a wrong key, 403 for a tenant key), in the Anthropic error format.

All three are answered by a small outermost ASGI middleware, ahead of the front door's key
check, so the dashboard does not depend on the front door's path lists.

Where the numbers come from (nothing here is estimated when it can be counted):

* running / waiting requests, KV pages and prefix-cache lookups: ``AsyncEngine.stats()``.
* TTFT and inter-token latency percentiles: the exact values ``Metrics.ttft`` / ``Metrics.itl``
  observe (the histograms' ``observe`` is tapped into a bounded ring buffer of recent values),
  over a sliding window.
* output and prefill tokens/s, machine busy time and the decode steps behind the roofline
  figure: a step listener (``EngineCore.add_step_listener``, beside the cost ledger's), which
  sees every forward pass, its duration and the tokens of each request in it.
* dollars and joules: the cost ledger's running totals (``ctx.ledger.totals()``), so $ per
  million tokens and J per token are machine cost / tokens over the window.
* host-roofline efficiency: decode steps of the last minute, bytes they had to read (the
  model's weights once per step plus every sequence's KV) / their time, over this machine's
  measured read bandwidth (``economics.host.measure_bandwidth``, run once in a background thread
  the first time the dashboard is polled while the engine is idle: ~0.6 s of every core, so
  not at start-up; ``host_bandwidth=`` skips it).

History is kept only while someone watches: a sample is taken when the data endpoint is
polled (at most every ``min_interval`` seconds) and the last ``history`` samples are kept, so
an unwatched server pays for nothing but the taps (a deque append per observation/step).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.requests import Request

from tokenfactory.api.errors import APIError, error_response, new_request_id

log = logging.getLogger("tokenfactory.api.dashboard")

STATIC_DIR = Path(__file__).parent / "static"
PAGE = "dashboard.html"
DATA_PATH = "/dashboard/data"
# The only files served from /dashboard/static/ (no path from the URL ever reaches the disk).
ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
}
SHELL_HEADERS = [
    (b"cache-control", b"no-cache"),
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'"),
]
PERCENTILES = (50, 90, 99)


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list (non-empty)."""
    k = max(0, math.ceil(p / 100.0 * len(sorted_values)) - 1)
    return sorted_values[min(k, len(sorted_values) - 1)]


def decode_weight_bytes(model) -> int:
    """Bytes a decode step streams from memory: every weight once (parameters and the
    ``weight``/``bias`` buffers CPU linears keep), shared tensors once, the token embedding
    only when the LM head reads it in full (tied), pre-packed duplicates not at all."""
    seen: set[int] = set()
    total = 0
    named = list(model.named_parameters(remove_duplicate=False))
    named += [(n, b) for n, b in model.named_buffers(remove_duplicate=False)
              if b is not None and n.rsplit(".", 1)[-1] in ("weight", "bias")]
    for name, t in named:
        if "embed_tokens" in name or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


class _Ring:
    """Recent (monotonic time, value) observations, bounded."""

    def __init__(self, maxlen: int):
        self.items: deque[tuple[float, float]] = deque(maxlen=maxlen)

    def add(self, value: float) -> None:
        self.items.append((time.monotonic(), float(value)))

    def window(self, since: float) -> list[float]:
        out = []
        for t, v in reversed(self.items):   # newest first; stop at the window's start
            if t < since:
                break
            out.append(v)
        out.sort()
        return out


def _tap(histogram, ring: _Ring) -> None:
    """Copy every value ``histogram`` observes into ``ring`` (an instance attribute shadows
    the class's ``observe``; the histogram, and /metrics, are otherwise untouched)."""
    original = histogram.observe

    def observe(amount, *args, **kwargs):
        original(amount, *args, **kwargs)
        ring.add(amount)

    histogram.observe = observe


class DashboardState:
    """Taps, counters and the sample history behind ``/dashboard/data``."""

    def __init__(self, ctx, metrics, *, window: float = 10.0, history: int = 600,
                 min_interval: float = 0.5, roofline_window: float = 60.0,
                 host_bandwidth: float | None = None, measure_host: bool = True,
                 poll_ms: int = 1000):
        self.ctx = ctx
        self.engine = ctx.engine
        self.core = ctx.engine.core
        self.window = window
        self.min_interval = min_interval
        self.roofline_window = roofline_window
        self.poll_ms = poll_ms
        self.samples: deque[dict] = deque(maxlen=history)
        self._mono: deque[float] = deque(maxlen=history)   # monotonic time of each sample
        self._raw: deque[dict] = deque(maxlen=history)     # cumulative counters per sample
        self._lock = threading.Lock()
        self._sample_lock = threading.Lock()
        # per-step counters (engine thread writes, the event loop reads under _lock)
        self.steps = 0
        self.busy_seconds = 0.0
        self.output_tokens = 0
        self.prefill_tokens = 0
        self.decode_steps: deque[tuple[float, float, int, int]] = deque(maxlen=8192)
        self._hook_failed = False
        self.ttft = _Ring(2048)
        self.itl = _Ring(32768)   # ~16 s of 64 streams at 30 tokens/s
        _tap(metrics.ttft, self.ttft)
        _tap(metrics.itl, self.itl)
        self.core.add_step_listener(self._on_step)
        # roofline inputs
        model = getattr(self.core.executor, "model", None)
        self.weight_bytes = decode_weight_bytes(model) if model is not None else None
        block = self.core.config.block_size
        self.kv_bytes_per_token = self.core.executor.kv_cache_bytes_per_block(block) / block
        self.bandwidth = host_bandwidth
        self.roofline_note = None
        self._measure = measure_host and host_bandwidth is None and self.weight_bytes is not None
        self._measuring = False
        if self.weight_bytes is None:
            self.roofline_note = "the executor streams no weights (scripted or simulated)"
        elif self.bandwidth is None and not measure_host:
            self.roofline_note = "host bandwidth not measured (measure_host=False)"

    # ------------------------------------------------------------------ engine thread
    def _on_step(self, seconds: float, tokens_by_request: dict[str, int]) -> None:
        if self._hook_failed:
            return
        try:
            self._count_step(seconds, tokens_by_request)
        except Exception:  # noqa: BLE001 - a dashboard bug must never stop the engine
            self._hook_failed = True
            log.exception("dashboard step accounting failed; step counters disabled")

    def _count_step(self, seconds: float, tokens_by_request: dict[str, int]) -> None:
        # Called after the forward pass, before the engine updates the requests: a chunk
        # samples a token when it reaches the end of the request's known tokens.
        requests = self.core.scheduler.requests
        out = prefill = kv_tokens = 0
        decode_only = True
        for rid, n in tokens_by_request.items():
            req = requests.get(rid)
            if req is None:
                decode_only = False
                continue
            done = req.num_computed_tokens
            if done + n >= req.num_tokens:
                out += 1
            if done < req.num_prompt_tokens:
                prefill += min(n, req.num_prompt_tokens - done)
                decode_only = False
            elif n != 1:
                decode_only = False
            kv_tokens += done + n
        with self._lock:
            self.steps += 1
            self.busy_seconds += seconds
            self.output_tokens += out
            self.prefill_tokens += prefill
            if decode_only and tokens_by_request:
                self.decode_steps.append((time.monotonic(), seconds, len(tokens_by_request),
                                          kv_tokens))

    # ------------------------------------------------------------------ roofline
    def _start_measuring(self) -> None:
        if not self._measure or self._measuring or self.bandwidth is not None:
            return
        stats = self.engine.stats()
        if stats.num_running or stats.num_waiting:
            return   # measured while idle: a busy engine would halve what it finds
        self._measuring = True

        def run():
            try:
                from tokenfactory.economics.host import measure_bandwidth
                _, details = measure_bandwidth(seconds=0.6, array_bytes=64 << 20)
                self.bandwidth = details["read_bytes_per_s"]
            except Exception as exc:  # noqa: BLE001 - the dashboard goes on without it
                self.roofline_note = f"host bandwidth could not be measured: {exc}"
                log.warning("dashboard: %s", self.roofline_note)

        threading.Thread(target=run, name="tokenfactory-dashboard-bandwidth", daemon=True).start()

    def _roofline(self, now: float) -> dict[str, Any]:
        with self._lock:
            steps = [s for s in self.decode_steps if s[0] >= now - self.roofline_window]
        out: dict[str, Any] = {"decode_steps": len(steps), "efficiency": None,
                               "achieved_bytes_per_s": None}
        if self.weight_bytes is None or not steps:
            return out
        seconds = sum(s[1] for s in steps)
        moved = sum(self.weight_bytes + s[3] * self.kv_bytes_per_token for s in steps)
        if seconds > 0:
            out["achieved_bytes_per_s"] = moved / seconds
            if self.bandwidth:
                out["efficiency"] = moved / seconds / self.bandwidth
        return out

    # ------------------------------------------------------------------ sampling
    def _raw_counters(self) -> dict[str, float]:
        t = self.ctx.ledger.totals()
        s = self.engine.stats()
        with self._lock:
            return {"out": self.output_tokens, "prefill": self.prefill_tokens,
                    "busy": self.busy_seconds, "steps": self.steps,
                    "dollars": t.dollars, "joules": t.joules, "machine": t.machine_seconds,
                    "tokens": t.tokens_processed, "finished": t.requests_finished,
                    "queries": s.prefix_cache_queries, "hits": s.prefix_cache_hits}

    def sample(self) -> None:
        """Append a sample unless the last one is younger than ``min_interval``."""
        with self._sample_lock:
            now = time.monotonic()
            if self._mono and now - self._mono[-1] < self.min_interval:
                return
            stats = self.engine.stats()
            cached = self.core.kv.pool.stats().num_cached
            raw = self._raw_counters()
            sample: dict[str, Any] = {
                "t": round(time.time(), 3),
                "running": stats.num_running, "waiting": stats.num_waiting,
                "kv_total": stats.kv_blocks_total,
                "kv_used": stats.kv_blocks_total - stats.kv_blocks_free,
                "kv_cached": cached, "kv_pinned": stats.kv_blocks_pinned,
                "output_tokens": raw["out"], "requests_finished": raw["finished"],
                "machine_seconds": round(raw["machine"], 6), "dollars": raw["dollars"],
                "joules": raw["joules"],
            }
            for name, ring in (("ttft", self.ttft), ("itl", self.itl)):
                values = ring.window(now - self.window)
                for p in PERCENTILES:
                    sample[f"{name}_p{p}"] = percentile(values, p) if values else None
            # rates against the oldest sample inside the window
            base_i = next((i for i, t in enumerate(self._mono) if t >= now - self.window), None)
            rates = dict.fromkeys(("out_tps", "prefill_tps", "busy", "hit_rate",
                                   "usd_per_mtok_out", "usd_per_mtok", "j_per_token_out"))
            if base_i is not None:
                b, dt = self._raw[base_i], now - self._mono[base_i]
                d = {k: raw[k] - b[k] for k in raw}
                if dt > 0:
                    rates["out_tps"] = d["out"] / dt
                    rates["prefill_tps"] = d["prefill"] / dt
                    rates["busy"] = min(1.0, d["busy"] / dt)
                if d["queries"] > 0:
                    rates["hit_rate"] = d["hits"] / d["queries"]
                if d["out"] > 0:
                    rates["usd_per_mtok_out"] = d["dollars"] / d["out"] * 1e6
                    rates["j_per_token_out"] = d["joules"] / d["out"]
                if d["tokens"] > 0:
                    rates["usd_per_mtok"] = d["dollars"] / d["tokens"] * 1e6
            sample.update(rates)
            roof = self._roofline(now)
            sample["roofline_eff"] = roof["efficiency"]
            sample["decode_gbps"] = (roof["achieved_bytes_per_s"] / 1e9
                                     if roof["achieved_bytes_per_s"] else None)
            for k, v in sample.items():   # JSON has no NaN/inf
                if isinstance(v, float) and not math.isfinite(v):
                    sample[k] = None
            self.samples.append(sample)
            self._mono.append(now)
            self._raw.append(raw)

    def payload(self, since: float | None = None) -> dict[str, Any]:
        self._start_measuring()
        self.sample()
        samples = [s for s in list(self.samples) if since is None or s["t"] > since]
        opts = self.ctx.options
        note = self.roofline_note
        if note is None and self.bandwidth is None:
            note = ("measuring the host's memory bandwidth ..." if self._measuring else
                    "waiting for an idle moment to measure the host's memory bandwidth")
        return {
            "model": opts.served_model_name, "poll_ms": self.poll_ms, "window_s": self.window,
            "config": {"kv_pages_total": self.core.kv.num_blocks,
                       "block_size": self.core.config.block_size,
                       "cost_per_hour": opts.cost_per_hour, "watts": opts.watts},
            "roofline": {"bandwidth_bytes_per_s": self.bandwidth,
                         "weight_bytes": self.weight_bytes,
                         "kv_bytes_per_token": self.kv_bytes_per_token,
                         "window_s": self.roofline_window, "note": note},
            "samples": samples,
        }


class _DashboardDoor:
    """Answers the dashboard's paths ahead of the front door (outermost ASGI middleware).

    The page and its static files are public: they hold no data, and a browser cannot attach
    a key to a page load. ``/dashboard/data`` is checked here by ``authorize`` (the operator's
    metrics key: the data covers every tenant's traffic), so it does not depend on which key
    kind the front door asks for on other paths; failures use the Anthropic error format of
    every non-OpenAI route (errors.error_response).
    """

    def __init__(self, app, files: dict[str, tuple[bytes, str]], state: "DashboardState",
                 authorize: Callable[[Request], Any] | None):
        self.app = app
        self.files = files   # URL path -> (body, content type)
        self.state = state
        self.authorize = authorize

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path == DATA_PATH:
            return await self._data(scope, receive, send)
        hit = self.files.get(path)
        if hit is None:
            return await self.app(scope, receive, send)
        body, ctype = hit
        headers = [(b"content-type", ctype.encode()),
                   (b"content-length", str(len(body)).encode()), *SHELL_HEADERS]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body",
                    "body": body if scope["method"] == "GET" else b""})

    async def _data(self, scope, receive, send):
        request = Request(scope)
        rid = new_request_id()
        try:
            if self.authorize is not None:
                self.authorize(request)
            raw = request.query_params.get("since")
            try:
                since = float(raw) if raw not in (None, "") else None
            except ValueError:
                raise APIError(400, f"since: expected unix seconds, got {raw!r}",
                               param="since") from None
            if since is not None and not math.isfinite(since):
                raise APIError(400, "since: expected a finite number", param="since")
            resp = JSONResponse(self.state.payload(since),
                                headers={"request-id": rid, "cache-control": "no-store"})
        except APIError as exc:
            resp = error_response(DATA_PATH, exc.status, exc.message, request_id=rid,
                                  param=exc.param, headers=exc.headers)
        await resp(scope, receive, send)


def _shell_files() -> dict[str, tuple[bytes, str]]:
    page = (STATIC_DIR / PAGE).read_bytes()
    files = {"/dashboard": (page, "text/html; charset=utf-8"),
             "/dashboard/": (page, "text/html; charset=utf-8")}
    for name, ctype in ASSETS.items():
        files[f"/dashboard/static/{name}"] = ((STATIC_DIR / name).read_bytes(), ctype)
    return files


def install_dashboard(app: FastAPI, ctx, metrics, *,
                      authorize: Callable[[Request], Any] | None = None,
                      **options: Any) -> DashboardState:
    """Mount the dashboard on ``app`` before it starts (it adds a middleware, which Starlette
    refuses once an app has served). ``authorize(request)`` raises APIError (401/403) unless
    the request may read server-wide metrics: ``Authenticator(keys, metrics_key)
    .check_metrics_access``; None leaves the data open. ``options`` are DashboardState's
    keyword arguments (window, history, poll_ms, host_bandwidth, measure_host, ...).
    Idempotent: an app that already has a dashboard keeps it (taps and hooks are not doubled)."""
    existing = getattr(app.state, "dashboard", None)
    if existing is not None:
        return existing
    state = DashboardState(ctx, metrics, **options)
    app.state.dashboard = state
    app.add_middleware(_DashboardDoor, files=_shell_files(), state=state, authorize=authorize)
    return state
