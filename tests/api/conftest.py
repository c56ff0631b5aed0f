"""A live tokenfactory server on a free loopback port, backed by a ScriptedExecutor.

The scripted model answers with the text registered under the last ``[[reply:KEY]]`` marker in
its prompt (see REPLIES), tokenized with the demo tokenizer and followed by EOS, so tool calls,
stop sequences and streaming are deterministic while scheduling and KV pages are real.
"""
from __future__ import annotations

import re
import threading
import time
from contextlib import contextmanager

import pytest
import uvicorn

from tokenfactory.api.server import create_app
from tokenfactory.engine.async_engine import AsyncEngine
from tokenfactory.engine.core import EngineConfig, EngineCore
from tokenfactory.engine.executor import ScriptedExecutor

BLOCK_SIZE = 16
NUM_BLOCKS = 512
MODEL_LEN = 8192

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
    "forced_any": 'get_weather", "arguments": {"city": "Rome"}}\n</tool_call>',
    "forced_tool": '{"city": "Lima"}}\n</tool_call>',
    "continue": " and that is the end.",
}
_MARKER = re.compile(r"\[\[reply:(\w+)\]\]")


class FakeClock:
    """Monotonic time plus an offset the test can advance (pins expire without sleeping)."""

    def __init__(self):
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from tokenfactory.text.demo_tokenizer import train_demo_tokenizer
    return train_demo_tokenizer(tmp_path_factory.mktemp("demo_tokenizer"))


def make_engine(tokenizer, *, clock=None, num_blocks=NUM_BLOCKS, max_queued_requests=None,
                model_len=MODEL_LEN, script=None, **config):
    eos = min(tokenizer.eos_token_ids)
    cache: dict[tuple, list[int]] = {}
    script_override = script

    def script(req):
        text = tokenizer.decode(req.prompt_token_ids, skip_special_tokens=False)
        keys = _MARKER.findall(text)
        key = keys[-1] if keys else "hello"
        reply = REPLIES.get(key, REPLIES["hello"])
        if (key, reply) not in cache:
            cache[(key, reply)] = tokenizer.encode(reply) + [eos]
        return cache[(key, reply)]

    executor = ScriptedExecutor(script_override or script, fallback_token=eos)
    inner = executor.execute
    flags: dict[str, tuple[bool, bool]] = {}

    def execute(batch):
        # "[[slow]]" in a prompt: each step takes 80 ms (pings, disconnects);
        # "[[fail]]": the forward pass raises (engine fault injection).
        for c in batch.chunks:
            rid = c.request.request_id
            if rid not in flags:
                text = tokenizer.decode(c.request.prompt_token_ids, skip_special_tokens=False)
                flags[rid] = ("[[slow]]" in text, "[[fail]]" in text)
            slow, fail = flags[rid]
            if fail:
                raise RuntimeError("injected forward-pass failure")
            if slow:
                time.sleep(0.08)
        return inner(batch)
    executor.execute = execute
    cfg = EngineConfig(block_size=BLOCK_SIZE, num_kv_blocks=num_blocks,
                       max_num_batched_tokens=config.pop("max_num_batched_tokens", 2048), **config)
    core = EngineCore(executor, cfg, model_max_len=model_len, tokenizer=tokenizer,
                      eos_token_ids=[eos], clock=clock or FakeClock())
    return AsyncEngine(core, max_queued_requests=max_queued_requests)


class LiveServer:
    def __init__(self, engine, app, base_url, clock):
        self.engine, self.app, self.base_url, self.clock = engine, app, base_url, clock

    @property
    def core(self):
        return self.engine.core

    def wait_idle(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.engine.num_in_flight() == 0 and not self.core.has_unfinished_requests():
                return
            time.sleep(0.01)
        raise AssertionError("server did not become idle")

    def assert_no_leaks(self) -> None:
        self.wait_idle()
        assert self.core.num_free_blocks() == self.core.kv.num_blocks, "KV pages leaked"
        assert self.core.num_running == 0 and self.core.num_waiting == 0


@contextmanager
def live_server(tokenizer, *, engine_kwargs=None, engine=None, **app_options):
    """Start uvicorn in a thread around a fresh scripted engine (or ``engine``); stop both."""
    clock = FakeClock()
    if engine is None:
        engine = make_engine(tokenizer, clock=clock, **(engine_kwargs or {}))
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
        yield LiveServer(engine, app, f"http://127.0.0.1:{port}", clock)
    finally:
        server.should_exit = True
        thread.join(10)
        engine.shutdown()


@pytest.fixture(scope="module")
def server(tokenizer):
    with live_server(tokenizer, aliases=[("claude-*", "tf-test")], min_cache_tokens=1024) as s:
        yield s


@pytest.fixture
def anthropic_client(server):
    import anthropic
    return anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0)


@pytest.fixture
def openai_client(server):
    import openai
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
