"""Fixtures for the API suite: a live tokenfactory server on a free loopback port, backed by a
ScriptedExecutor (see tests/live.py: the ``[[reply:KEY]]`` marker in a prompt picks the answer),
so tool calls, stop sequences and streaming are deterministic while scheduling and KV pages are
real."""
from __future__ import annotations

import pytest

from tests.live import (BLOCK_SIZE, MODEL_LEN, NUM_BLOCKS, REPLIES, FakeClock,  # noqa: F401
                        LiveServer, live_server, make_engine)


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
