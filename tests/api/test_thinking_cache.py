"""Thinking blocks rendered back keep a conversation's prefix cache warm.

A Qwen3-style template (tests/api/test_thinking_budget.py) renders the reasoning of assistant
turns after the last user query back as ``<think>\\n…\\n</think>\\n\\n``. When a client returns
the thinking blocks it was given, the next turn's prompt is the previous prompt plus the reply,
byte for byte, so the whole previous turn - prompt and generated reply - is read from the
prefix cache. Driven through the official SDK over three turns; the scripted model writes the
replies (the engine's scheduler and KV pages are real, and so is ``cache_read_input_tokens``)."""
from __future__ import annotations

import shutil

import anthropic
import pytest

from tests.live import live_server, make_engine

from .test_thinking_budget import QWEN3_STYLE, with_template

SYSTEM = ("You are a field assistant for a weather service. Answer briefly, check the data "
          "before you answer, and say which station a reading came from. ") * 4
TOOL = {"name": "get_weather", "description": "Current weather at a station",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                         "required": ["city"]}}
# turn -> the scripted reply (the turn is counted by the tool results already in the prompt)
REPLIES = [
    "<think>\nThe user wants the weather in Oslo. I should ask the station first.\n</think>\n\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
    "<think>\nOslo reports rain. Bergen is close; compare it before answering.\n</think>\n\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bergen"}}\n</tool_call>',
    "<think>\nBoth stations report rain, so the answer is simple.\n</think>\n\n"
    "It is raining in Oslo (station OSL-1) and in Bergen (BGO-2).",
]


@pytest.fixture(scope="module")
def cache_server(demo_tokenizer_dir, tmp_path_factory):
    from tokenfactory.text.tokenizer import Tokenizer
    out = with_template(demo_tokenizer_dir, tmp_path_factory.mktemp("qwen3_style_tok"),
                        QWEN3_STYLE)
    tok = Tokenizer.from_dir(out)
    eos = min(tok.eos_token_ids)
    encoded = [tok.encode(r) + [eos] for r in REPLIES]

    def script(state):
        text = tok.decode(state.prompt_token_ids, skip_special_tokens=False)
        if "[[plain]]" in text:   # a conversation without tools: the text answer
            return encoded[-1]
        return encoded[min(text.count("<tool_response>"), len(encoded) - 1)]

    with live_server(tok, engine=make_engine(tok, script=script)) as srv:
        yield srv


def test_three_turns_with_thinking_read_the_previous_turn_from_cache(cache_server):
    client = anthropic.Anthropic(base_url=cache_server.base_url, api_key="x", max_retries=0)
    messages = [{"role": "user", "content": "What is the weather in Oslo and Bergen?"}]
    turns = []
    for turn in range(3):
        msg = client.messages.create(model="tf-test", max_tokens=2048, system=SYSTEM,
                                     messages=messages, tools=[TOOL],
                                     thinking={"type": "enabled", "budget_tokens": 1024})
        u = msg.usage
        prompt = u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens
        turns.append((prompt, u.cache_read_input_tokens, u.output_tokens))
        assert msg.content[0].type == "thinking"
        # the client sends the assistant turn back as it came, thinking blocks included
        messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True)
                                                          for b in msg.content]})
        if msg.stop_reason == "tool_use":
            city = msg.content[-1].input["city"]
            messages.append({"role": "user", "content": [{
                "type": "tool_result", "tool_use_id": msg.content[-1].id,
                "content": f"{city}: rain, 7 C (station {city[:3].upper()}-1)"}]})
    assert msg.stop_reason == "end_turn" and msg.content[-1].type == "text"
    for (prev_prompt, _, prev_out), (_, read, _) in zip(turns, turns[1:]):
        # turn N+1 reads all of turn N's prompt, and its reply too (rendered back exactly),
        # but for the last partial page and the reply's final token
        assert read >= 0.9 * prev_prompt
        assert read >= prev_prompt + prev_out - 2 * 16
    print("turns (prompt tokens, cache reads, output tokens):", turns,
          "read / previous prompt:", [round(r / p, 3) for (p, _, _), (_, r, _)
                                      in zip(turns, turns[1:])])
    cache_server.assert_no_leaks()


def test_three_user_turns_with_thinking_read_the_previous_prompt(cache_server):
    """With a new user message each turn, the Qwen3-style template drops earlier turns'
    reasoning (as Qwen3 does): turn N's prompt is still a prefix of turn N+1's, so the whole
    of it (but its last partial page) is read from cache."""
    client = anthropic.Anthropic(base_url=cache_server.base_url, api_key="x", max_retries=0)
    messages, turns = [], []
    for question in ("Is it raining in Oslo? [[plain]]", "And in Bergen?", "Which is wetter?"):
        messages.append({"role": "user", "content": question})
        msg = client.messages.create(model="tf-test", max_tokens=2048, system=SYSTEM,
                                     messages=messages,
                                     thinking={"type": "enabled", "budget_tokens": 1024})
        u = msg.usage
        turns.append((u.input_tokens + u.cache_read_input_tokens
                      + u.cache_creation_input_tokens, u.cache_read_input_tokens))
        assert [b.type for b in msg.content] == ["thinking", "text"]
        messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True)
                                                          for b in msg.content]})
    for (prev_prompt, _), (_, read) in zip(turns, turns[1:]):
        assert read >= 0.9 * prev_prompt and read >= prev_prompt - 16
    print("turns (prompt tokens, cache reads):", turns, "read / previous prompt:",
          [round(r / p, 3) for (p, _), (_, r) in zip(turns, turns[1:])])
    cache_server.assert_no_leaks()
