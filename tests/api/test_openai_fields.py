"""Every OpenAI request field either works or is a clear 400 (issue 19): reasoning_effort,
chat_template_kwargs and reasoning_content on a reasoning template; legacy functions, audio,
predicted outputs, web search, service tiers, verbosity, completions suffix / best_of."""
from __future__ import annotations

import openai
import pytest

from .test_thinking import HI, THOUGHT, think_server  # noqa: F401 - the module fixture


@pytest.mark.parametrize("extra,needle", [
    ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"web_search_options": {"search_context_size": "low"}}, "web_search_options"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"verbosity": "low"}, "verbosity"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
])
def test_chat_fields_this_server_cannot_honour_are_400(openai_client, server, extra, needle):
    with pytest.raises(openai.BadRequestError, match=needle) as err:
        openai_client.chat.completions.create(model="tf-test", messages=HI, max_tokens=4,
                                              extra_body=extra)
    assert err.value.body["type"] == "invalid_request_error"
    ok = openai_client.chat.completions.create(
        model="tf-test", messages=HI, max_tokens=4, service_tier="auto", modalities=["text"],
        user="u1", store=False, metadata={"k": "v"}, reasoning_effort="low",
        extra_body={"chat_template_kwargs": {"anything": 1}})
    assert ok.choices[0].message.content
    server.assert_no_leaks()


def test_completion_fields(openai_client, server):
    with pytest.raises(openai.BadRequestError, match="suffix"):
        openai_client.completions.create(model="tf-test", prompt="Hi", max_tokens=4,
                                         suffix=" end")
    with pytest.raises(openai.BadRequestError, match="best_of"):
        openai_client.completions.create(model="tf-test", prompt="Hi", max_tokens=4, best_of=3)
    ok = openai_client.completions.create(model="tf-test", prompt="Hi", max_tokens=4,
                                          best_of=2, n=2)
    assert len(ok.choices) == 2
    server.assert_no_leaks()


def test_reasoning_switches_and_render_back(think_server):  # noqa: F811
    """On a Qwen3-style template: reasoning_effort "none" and chat_template_kwargs switch
    the template's reasoning off (a longer prompt: the closed section is in it), and an
    assistant turn's reasoning_content is rendered back into the next prompt."""
    client = openai.OpenAI(base_url=think_server.base_url + "/v1", api_key="x", max_retries=0)

    def prompt_tokens(messages=HI, **kw):
        return client.chat.completions.create(model="tf-test", messages=messages,
                                              max_tokens=4, **kw).usage.prompt_tokens
    plain = prompt_tokens()
    assert prompt_tokens(reasoning_effort="none") == prompt_tokens(
        extra_body={"chat_template_kwargs": {"enable_thinking": False}}) > plain
    r = client.chat.completions.create(model="tf-test", messages=HI, max_tokens=64)
    reply = r.choices[0].message
    assert reply.model_extra["reasoning_content"] == THOUGHT
    turn = [*HI, reply.model_dump(exclude_none=True), {"role": "user", "content": "More?"}]
    without = [*HI, {"role": "assistant", "content": reply.content},
               {"role": "user", "content": "More?"}]
    assert prompt_tokens(turn) > prompt_tokens(without)
    think_server.assert_no_leaks()
