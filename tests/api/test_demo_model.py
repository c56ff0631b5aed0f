"""The real forward pass behind the API: the built-in demo model (random weights, CPU)."""
from __future__ import annotations

import anthropic
import openai
import pytest

from .conftest import live_server


@pytest.fixture(scope="module")
def demo_server():
    from tokenfactory.engine.async_engine import AsyncEngine
    from tokenfactory.engine.llm import build_engine_core
    from tokenfactory.model.demo import ensure_demo_checkpoint

    core = build_engine_core(ensure_demo_checkpoint(), compile=False, max_model_len=1024,
                             kv_cache_memory=32 << 20)
    with live_server(core.tokenizer, engine=AsyncEngine(core), served_model_name="demo",
                     random_weights=True) as srv:
        yield srv


def test_demo_model_messages_and_stream(demo_server):
    client = anthropic.Anthropic(base_url=demo_server.base_url, api_key="x", max_retries=0)
    kw = dict(model="demo", max_tokens=6, extra_body={"temperature": 0.0},
              messages=[{"role": "user", "content": "Hello there"}])
    msg = client.messages.create(**kw)
    assert msg.usage.output_tokens <= 6 and msg.stop_reason in ("max_tokens", "end_turn")
    with client.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == msg.content[0].text   # greedy: same text streamed or not
    n = client.messages.count_tokens(model="demo", messages=kw["messages"]).input_tokens
    u = final.usage
    assert u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens == n
    assert u.cache_read_input_tokens == ((n - 1) // 16) * 16   # the identical prompt, cached
    demo_server.assert_no_leaks()


def test_demo_model_openai_and_models(demo_server):
    client = openai.OpenAI(base_url=demo_server.base_url + "/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(model="demo", max_tokens=4, messages=[
        {"role": "user", "content": "hi"}])
    assert r.usage.completion_tokens <= 4
    card = client.models.list().data[0]
    assert card.id == "demo" and card.model_extra["random_weights"] is True
    demo_server.assert_no_leaks()
