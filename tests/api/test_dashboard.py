"""The live dashboard in a real browser: headless Chromium (Debian's ``chromium``) loads
``/dashboard`` of a live server while a bounded load generator runs; the page must draw data
that changes between two reads, and must show nothing without the key when keys are set.

The browser is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON
messages separated by NUL bytes on fds 3 and 4), so no websocket or Playwright dependency is
needed. A screenshot is written to ``$TOKENFACTORY_ARTIFACTS`` (default: pytest's tmp dir).
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

import tests.live
from tests.live import HEADERS, live_server
from tokenfactory.api.auth import Authenticator
from tokenfactory.api.dashboard import decode_weight_bytes, install_dashboard, percentile

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# CI installs chromium (`make test` does): there a missing browser is a failure, not a skip.
needs_chromium = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                    reason="Debian package chromium not installed")
TENANT_KEY = "tenant-key-1"
ADMIN_KEY = "operator-metrics-key"


# --------------------------------------------------------------------------- the browser
class Chromium:
    """Headless Chromium on a DevTools pipe, one page attached (flattened session)."""

    def __init__(self, profile: str):
        cmd_r, cmd_w = os.pipe()     # we write commands; chromium reads fd 3
        ev_r, ev_w = os.pipe()       # chromium writes fd 4; we read
        # fds chromium will see, moved out of the way of 3 and 4 first
        child_r = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 100)
        child_w = fcntl.fcntl(ev_w, fcntl.F_DUPFD, 100)
        os.close(cmd_r)
        os.close(ev_w)
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--remote-debugging-pipe", f"--user-data-dir={profile}",
                 "--hide-scrollbars", "about:blank"]
        # a Python trampoline puts them on 3 and 4 and execs chromium (no preexec_fn in a
        # process with threads; dash cannot redirect fds above 9)
        trampoline = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
                      "os.execv(sys.argv[3], sys.argv[3:])")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", trampoline, str(child_r), str(child_w), CHROMIUM, *flags],
            pass_fds=(child_r, child_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(child_r)
        os.close(child_w)
        self.out, self.inp = cmd_w, ev_r
        self.buf = b""
        self.next_id = 0
        self.session = None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        attached = self.call("Target.attachToTarget", targetId=target, flatten=True)
        self.session = attached["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=1400, height=1500,
                  deviceScaleFactor=1, mobile=False)

    def call(self, method: str, timeout: float = 20.0, **params):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if self.session is not None and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self.out, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout   # hang guard
        while True:
            while b"\0" in self.buf:
                raw, self.buf = self.buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.next_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            left = deadline - time.monotonic()
            assert left > 0, f"chromium did not answer {method}"
            ready, _, _ = select.select([self.inp], [], [], left)
            if ready:
                chunk = os.read(self.inp, 1 << 20)
                assert chunk, "chromium closed the DevTools pipe"
                self.buf += chunk

    def js(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                        awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def goto(self, url: str) -> None:
        self.call("Page.enable")
        self.call("Page.navigate", url=url)

    def wait_for(self, expression: str, timeout: float = 15.0):
        deadline = time.monotonic() + timeout   # hang guard, not a performance threshold
        while True:
            # (during a navigation the document may not have a body yet)
            value = self.js(f"(() => {{ try {{ return ({expression}); }} "
                            "catch (e) { return null; } })()")
            if value:
                return value
            assert time.monotonic() < deadline, f"page never satisfied {expression}"
            time.sleep(0.1)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.out)
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        os.close(self.inp)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (make test installs it)")
        pytest.skip("Debian package chromium not installed")
    # Chromium's helper processes can still be writing the profile for a moment after the
    # browser exits: a leftover file there must not fail the test run
    with tempfile.TemporaryDirectory(prefix="tf-chromium-", ignore_cleanup_errors=True) as profile:
        b = Chromium(profile)
        try:
            yield b
        finally:
            b.close()


@contextlib.contextmanager
def dashboard_server(tokenizer, **app_options):
    """live_server whose app gets the dashboard mounted before it starts (install_dashboard
    adds an ASGI middleware, which Starlette only allows before the first request). When
    create_app mounts it itself, install_dashboard returns that one (idempotent)."""
    real = tests.live.create_app
    states = []

    def create_app(engine, tok, **kw):
        app = real(engine, tok, **kw)
        ctx = app.state.ctx
        # server-wide data: the operator's metrics key, never a tenant key (auth.py)
        auth = Authenticator(ctx.options.api_keys, kw.get("metrics_key"))
        state = install_dashboard(app, ctx, ctx.metrics, authorize=auth.check_metrics_access)
        assert install_dashboard(app, ctx, ctx.metrics) is state
        states.append(state)
        return app

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tests.live, "create_app", create_app)
        with live_server(tokenizer, **app_options) as server:
            server.dashboard = states[0]
            yield server


class LoadGenerator:
    """A few client threads sending requests until stopped (bounded: at most ``limit`` each).
    One of them asks for the scripted model's slow mode, so latencies spread out."""

    def __init__(self, base_url: str, headers: dict, workers: int = 3, limit: int = 300):
        self.stop = threading.Event()
        self.sent = 0
        self.errors: list[str] = []
        prefix = "You are a helpful assistant of the token factory. " * 12
        self.threads = [threading.Thread(
            target=self._run, daemon=True,
            args=(base_url, headers, prefix + ("[[slow]]" if i == 0 else "") + "[[reply:long]]",
                  limit)) for i in range(workers)]

    def _run(self, base_url, headers, prompt, limit):
        with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
            for _ in range(limit):
                if self.stop.is_set():
                    return
                r = client.post("/v1/messages", json={
                    "model": "tf-test", "max_tokens": 24,
                    "messages": [{"role": "user", "content": prompt}]})
                self.sent += 1
                if r.status_code != 200:
                    self.errors.append(r.text)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            if t.is_alive():
                t.join(30)


def artifact_dir(tmp_path: Path) -> Path:
    out = Path(os.environ.get("TOKENFACTORY_ARTIFACTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


READ_STATE = """(() => {
  const tiles = {};
  for (const el of document.querySelectorAll('.tile'))
    tiles[el.dataset.key] = el.dataset.value ?? null;
  const charts = {};
  for (const el of document.querySelectorAll('.chart'))
    charts[el.id] = [Number(el.dataset.points), Number(el.dataset.nonnull || 0),
                     el.querySelectorAll('canvas').length];
  return {state: document.body.dataset.state, polls: Number(document.body.dataset.polls),
          tiles, charts, keyform: !document.getElementById('keyform').hidden};
})()"""


# --------------------------------------------------------------------------- tests
@needs_chromium
def test_dashboard_draws_live_data_under_load(tokenizer, browser, tmp_path):
    with dashboard_server(tokenizer) as server, LoadGenerator(server.base_url, HEADERS) as load:
        browser.goto(server.base_url + "/dashboard")
        # two polls with output behind them: the window's rates need a previous sample
        browser.wait_for("Number(document.querySelector('.tile[data-key=out_tps]')"
                         ".dataset.value || 0) > 0")
        first = browser.js(READ_STATE)
        browser.wait_for(f"document.body.dataset.polls > {first['polls'] + 1}")
        second = browser.js(READ_STATE)
        browser.screenshot(artifact_dir(tmp_path) / "dashboard.png")
        load.__exit__()
        server.wait_idle()
        # the step hook's token counts agree with what the requests themselves reported
        registry, state = server.app.state.ctx.metrics.registry, server.dashboard
        value = lambda name: registry.get_sample_value(f"tokenfactory_{name}_total")  # noqa: E731
        assert state.output_tokens == value("generation_tokens") > 0
        assert state.prefill_tokens == value("prompt_tokens") - value("cached_prompt_tokens") > 0
        assert state.decode_steps and all(batch <= 3 for _, _, batch, _ in state.decode_steps)
    assert not load.errors, load.errors[:2]
    assert second["state"] == "live" and not second["keyform"]
    for chart, (points, nonnull, canvases) in second["charts"].items():
        assert canvases == 1, f"{chart} has no canvas"
        assert points > first["charts"][chart][0], f"{chart} received no new samples"
    # every chart has drawn values (the roofline one too only when a model streams weights:
    # the scripted executor has none, so it stays empty and the note says why)
    for chart in ("chart-requests", "chart-ttft", "chart-itl", "chart-tps", "chart-kv",
                  "chart-cache", "chart-cost", "chart-energy"):
        assert second["charts"][chart][1] > 0, f"{chart} has no values"
    assert second["charts"]["chart-roofline"][1] == 0
    t1, t2 = first["tiles"], second["tiles"]
    assert float(t2["output_tokens"]) > float(t1["output_tokens"]) > 0
    assert float(t2["dollars"]) > float(t1["dollars"]) > 0
    assert float(t2["ttft_p50"]) > 0 and float(t2["itl_p50"]) > 0
    assert 0 < float(t2["hit_rate"]) <= 1          # the shared prefix is found again
    assert "streams no weights" in browser.js("document.getElementById('roofnote').textContent")


@needs_chromium
def test_dashboard_with_keys_shows_nothing_without_one(tokenizer, browser, tmp_path):
    with dashboard_server(tokenizer, api_keys={TENANT_KEY: "acme"},
                          metrics_key=ADMIN_KEY) as server:
        base = server.base_url
        # the shell is public (it holds no data); the data endpoint is not
        page = httpx.get(base + "/dashboard")
        assert page.status_code == 200 and "uPlot" in page.text
        assert httpx.get(base + "/dashboard/static/uPlot.iife.min.js").status_code == 200
        for headers, status in (({}, 401), ({"x-api-key": "wrong"}, 401),
                                ({"x-api-key": TENANT_KEY}, 403)):
            r = httpx.get(base + "/dashboard/data", headers=headers)
            assert r.status_code == status, r.text
            body = r.json()   # the Anthropic error format, as on every non-OpenAI route
            assert body["type"] == "error" and body["error"]["type"] in (
                "authentication_error", "permission_error"), body
        admin = {"authorization": f"Bearer {ADMIN_KEY}"}
        ok = httpx.get(base + "/dashboard/data", headers=admin)
        assert ok.status_code == 200 and ok.json()["samples"]
        last = ok.json()["samples"][-1]["t"]
        newer = httpx.get(base + f"/dashboard/data?since={last}", headers=admin).json()["samples"]
        assert all(s["t"] > last for s in newer)
        bad = httpx.get(base + "/dashboard/data?since=yesterday", headers=admin)
        assert bad.status_code == 400 and "since" in bad.json()["error"]["message"]

        browser.goto(base + "/dashboard")
        browser.wait_for("document.body.dataset.state === 'key'")
        time.sleep(1.5)   # more polls go by: still nothing shown
        locked = browser.js(READ_STATE)
        assert locked["keyform"] and locked["polls"] == 0
        assert all(points == 0 for points, _, _ in locked["charts"].values())
        assert all(v is None for v in locked["tiles"].values())
        browser.screenshot(artifact_dir(tmp_path) / "dashboard-locked.png")

        def submit(key):
            browser.js(f"document.getElementById('key').value = {key!r}; "
                       "document.getElementById('keyform').requestSubmit(); true")

        submit(TENANT_KEY)   # a tenant key sees no server-wide data either
        browser.wait_for("document.getElementById('keyerror').textContent.includes('tenant')")
        assert browser.js(READ_STATE)["polls"] == 0
        submit(ADMIN_KEY)
        browser.wait_for("document.body.dataset.state === 'live'")
        unlocked = browser.js(READ_STATE)
        assert not unlocked["keyform"] and unlocked["charts"]["chart-kv"][0] >= 1
        browser.js("sessionStorage.clear(); true")


# --------------------------------------------------------------------------- pieces
def test_percentile_is_nearest_rank():
    values = sorted([0.5, 0.1, 0.3, 0.2, 0.4])
    assert percentile(values, 50) == 0.3
    assert percentile(values, 90) == 0.5
    assert percentile(values, 1) == 0.1
    assert percentile([7.0], 99) == 7.0


def test_decode_weight_bytes_counts_tied_weights_once():
    torch = pytest.importorskip("torch")

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = torch.nn.Embedding(100, 8)
            self.proj = torch.nn.Linear(8, 8)                  # 64 + 8 floats
            self.lm_head = torch.nn.Linear(8, 100, bias=False)
            self.lm_head.weight = self.embed_tokens.weight    # tied: read in full once
            self.register_buffer("cos", torch.zeros(50, 4))   # not a weight

    assert decode_weight_bytes(Tiny()) == (64 + 8 + 800) * 4
