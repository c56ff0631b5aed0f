"""Test support shared by the API, robustness and Claude Code suites: live servers on free
loopback ports around a scripted engine, SSE parsing, and `tokenfactory serve` subprocesses.

* ``live_server(...)``: uvicorn in a thread around a fresh engine driven by a ScriptedExecutor.
  The scripted model answers with the text registered under the last ``[[reply:KEY]]`` marker in
  its prompt (REPLIES), then EOS. Other markers: ``[[slow]]`` (every step of that request takes
  80 ms), ``[[fail]]`` (its forward pass raises), ``[[fail_after:N]]`` (raises once it has N
  output tokens, i.e. mid-stream). The executor also records how many prompt tokens it computed
  per request (``computed``), a deterministic proxy for "how much engine work did this cost".
* ``ServeProcess``: the real ``tokenfactory serve`` CLI in a subprocess (the built-in demo model),
  with its log captured to a file.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

from tokenfactory.api.server import create_app
from tokenfactory.engine.async_engine import AsyncEngine
from tokenfactory.engine.core import EngineConfig, EngineCore
from tokenfactory.engine.executor import ScriptedExecutor

BLOCK_SIZE = 16
NUM_BLOCKS = 512
MODEL_LEN = 8192
HEADERS = {"anthropic-version": "2023-06-01", "content-type": "application/json"}

REPLIES = {
    "hello": "Hello! I am a scripted model.",
    "tool": 'Let me check the weather.\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris", "unit": "celsius"}}\n</tool_call>',
    "tool_only": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
    "two_tools": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
                 '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>',
    "bad_tool": '<tool_call>\n{"name": "get_weather", "arguments": {city: Paris}\n</tool_call>',
    "final": "It is sunny in Paris, 21 degrees.",
    "stop": "one two STOP three four",
    "long": " ".join(f"word{i}" for i in range(300)),
    # continuations after a tool_choice prefill ('<tool_call>\n{"name": ' + ...)
    "continue": " and that is the end.",
    "unicode": "Grüße, 世界! 🎉 ok",
}
WEATHER_TOOL = {"name": "get_weather", "description": "Weather for a city",
                "input_schema": {"type": "object", "properties": {
                    "city": {"type": "string"}, "unit": {"type": "string"}},
                    "required": ["city"]}}
_MARKER = re.compile(r"\[\[reply:(\w+)\]\]")
_FAIL_AFTER = re.compile(r"\[\[fail_after:(\d+)\]\]")


class FakeClock:
    """Monotonic time plus an offset the test can advance (pins expire without sleeping)."""

    def __init__(self):
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class RecordingScriptedExecutor(ScriptedExecutor):
    """ScriptedExecutor + prompt markers + a record of prompt tokens computed per request."""

    def __init__(self, tokenizer, replies=REPLIES, record_work: bool = True):
        eos = min(tokenizer.eos_token_ids)
        self.tokenizer = tokenizer
        self._encoded: dict[str, list[int]] = {}
        self._flags: dict[str, tuple[bool, bool, int | None]] = {}
        self.replies = replies
        self.computed: dict[str, int] = {}     # request id -> prompt tokens whose KV was computed
        self.record_work = record_work         # off for long runs (the dict would only grow)
        super().__init__(self._script, fallback_token=eos)

    def _text(self, state) -> str:
        return self.tokenizer.decode(state.prompt_token_ids, skip_special_tokens=False)

    def _script(self, state) -> list[int]:
        keys = _MARKER.findall(self._text(state))
        key = keys[-1] if keys and keys[-1] in self.replies else "hello"
        if key not in self._encoded:
            self._encoded[key] = self.tokenizer.encode(self.replies[key]) + [self.fallback_token]
        return self._encoded[key]

    def execute(self, plan):
        for sched in plan.requests:
            state = self.view(sched)
            rid = sched.request_id
            if rid not in self._flags:
                if len(self._flags) > 256:   # bounded: long soaks measure RSS
                    self._flags.clear()
                text = self._text(state)
                m = _FAIL_AFTER.search(text)
                self._flags[rid] = ("[[slow]]" in text, "[[fail]]" in text,
                                    int(m.group(1)) if m else None)
            slow, fail, fail_after = self._flags[rid]
            if fail or (fail_after is not None and sched.output_index >= fail_after):
                raise RuntimeError("injected forward-pass failure")
            if slow:
                time.sleep(0.08)
            prompt_len = len(state.prompt_token_ids)
            if self.record_work and sched.start < prompt_len:
                self.computed[rid] = (self.computed.get(rid, 0)
                                      + min(sched.end, prompt_len) - sched.start)
        return super().execute(plan)


def make_engine(tokenizer, *, clock=None, num_blocks=NUM_BLOCKS, max_queued_requests=None,
                model_len=MODEL_LEN, record_work=True, script=None, **config) -> AsyncEngine:
    """An AsyncEngine on a RecordingScriptedExecutor (``script`` overrides the marker replies)."""
    executor = RecordingScriptedExecutor(tokenizer, record_work=record_work)
    if script is not None:
        executor.script = script
    cfg = EngineConfig(block_size=BLOCK_SIZE, num_kv_blocks=num_blocks,
                       max_num_batched_tokens=config.pop("max_num_batched_tokens", 2048), **config)
    core = EngineCore(executor, cfg, model_max_len=model_len, tokenizer=tokenizer,
                      eos_token_ids=[executor.fallback_token], clock=clock or FakeClock())
    return AsyncEngine(core, max_queued_requests=max_queued_requests)


class LiveServer:
    def __init__(self, engine, app, base_url):
        self.engine, self.app, self.base_url = engine, app, base_url

    @property
    def clock(self):
        return self.core.clock

    @property
    def core(self):
        return self.engine.core

    @property
    def executor(self) -> RecordingScriptedExecutor:
        return self.core.executor

    def wait_idle(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout   # a hang guard, not a performance threshold
        while time.monotonic() < deadline:
            if self.engine.num_in_flight() == 0 and not self.core.has_unfinished_requests():
                return
            time.sleep(0.01)
        raise AssertionError(f"server did not become idle: {self.engine.num_in_flight()} in flight, "
                             f"{self.core.num_running} running, {self.core.num_waiting} waiting")

    def assert_no_leaks(self) -> None:
        """Idle, nothing stuck in the scheduler, every KV page back in the pool."""
        self.wait_idle()
        assert self.core.num_running == 0 and self.core.num_waiting == 0, "requests stuck"
        assert not self.core.scheduler.requests, "requests left in the scheduler's table"
        assert self.core.num_free_blocks() == self.core.kv.num_blocks, (
            f"KV pages leaked: {self.core.kv.num_blocks - self.core.num_free_blocks()}")
        ledger = self.app.state.ctx.ledger
        assert ledger.num_open() == 0, f"{ledger.num_open()} cost-ledger entries never closed"


@contextmanager
def live_server(tokenizer, *, engine_kwargs=None, engine=None, **app_options):
    """uvicorn in a thread around a fresh scripted engine (or ``engine``); stops both."""
    if engine is None:
        engine = make_engine(tokenizer, **(engine_kwargs or {}))
    app_options.setdefault("served_model_name", "tf-test")
    app_options.setdefault("ping_interval", 0.05)
    app = create_app(engine, tokenizer, **app_options)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield LiveServer(engine, app, f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(10)
        engine.shutdown()


def parse_sse(text: str) -> list[tuple[str | None, object]]:
    """SSE text -> [(event name or None, parsed JSON or "[DONE]")]; comments are skipped."""
    frames, event, data = [], None, []
    for line in text.split("\n"):
        line = line.rstrip("\r")
        if line == "":
            if data:
                raw = "\n".join(data)
                frames.append((event, raw if raw == "[DONE]" else json.loads(raw)))
            event, data = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    assert not data, "stream ended inside a frame"
    return frames


# --------------------------------------------------------------------------- subprocesses
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """``python -m tokenfactory.cli serve`` on a free port (demo model), log in a file."""

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"serve-{self.port}.log"
        self._log = open(self.log_path, "w+")
        cmd = [sys.executable, "-m", "tokenfactory.cli", "serve", "--demo", "--port", str(self.port),
               "--max-model-len", "512", "--kv-cache-memory", "16M", *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    def wait_healthy(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout   # hang guard (first run builds the demo model)
        while True:
            assert self.proc.poll() is None, f"server exited early:\n{self.log()}"
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"server did not come up:\n{self.log()}"
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()
