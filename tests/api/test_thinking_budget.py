"""Thinking budgets on a real forward pass: a random-weight model (the demo checkpoint, float32)
served with a Qwen3-style chat template. A random model never closes its reasoning section on
its own, so a closed section, and where it closed, is the budget's doing.

``thinking: {type: enabled, budget_tokens}``, ``output_config.effort`` (Anthropic) and
``reasoning_effort`` (OpenAI) bound the section; ``thinking: {type: disabled}`` renders the
template's switch off. Token positions are read from OpenAI logprobs (each entry is one
generated token, with its exact bytes), so the count of reasoning tokens is exact."""
from __future__ import annotations

import json
import shutil

import anthropic
import openai
import pytest

from .conftest import live_server

# A Qwen3-style template, written for these tests: ChatML turns, Hermes tools, the reasoning of
# assistant turns after the last user query rendered back as <think>\n…\n</think>\n\n (earlier
# turns' reasoning is dropped, as Qwen3 does), and the enable_thinking switch.
QWEN3_STYLE = (
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- if tools %}<|im_start|>system\n{%- if messages[0].role == 'system' %}"
    "{{ messages[0].content }}\n\n{%- endif %}# Tools\n<tools>{% for t in tools %}\n"
    "{{ t | tojson }}{% endfor %}\n</tools>\nCall a tool inside <tool_call></tool_call> tags."
    "<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' %}{%- if not (tools and loop.first) %}<|im_start|>system\n"
    "{{ m.content }}<|im_end|>\n{%- endif %}"
    "{%- elif m.role == 'assistant' %}<|im_start|>assistant\n"
    "{%- if m.reasoning_content and loop.index0 > ns.last_query %}<think>\n"
    "{{ m.reasoning_content.strip() }}\n</think>\n\n{%- endif %}{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}{%- if m.content or not loop.first %}\n{%- endif %}"
    "<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{%- endif %}{%- endif %}")


def with_template(src, out, template: str):
    """A copy of checkpoint/tokenizer directory ``src`` whose chat template is ``template``."""
    for f in src.iterdir():
        if f.name == "model.safetensors":
            (out / f.name).symlink_to(f)
        elif f.is_file():
            shutil.copy(f, out / f.name)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    (out / "chat_template.jinja").unlink(missing_ok=True)
    return out


@pytest.fixture(scope="module")
def qwen_style(tmp_path_factory):
    from tokenfactory.engine.async_engine import AsyncEngine
    from tokenfactory.engine.llm import build_engine_core
    from tokenfactory.model.demo import ensure_demo_checkpoint

    path = with_template(ensure_demo_checkpoint(), tmp_path_factory.mktemp("qwen3_style"),
                         QWEN3_STYLE)
    core = build_engine_core(path, dtype="float32", compile=False, max_model_len=2048,
                             kv_cache_memory=16 << 20)
    with live_server(core.tokenizer, engine=AsyncEngine(core), served_model_name="q",
                     random_weights=True) as srv:
        yield srv


HI = [{"role": "user", "content": "Hi"}]


def _section(entries) -> tuple[int, int]:
    """(first token after "<think>", first token of the closing "\\n</think>") of a reply's
    logprob entries (one per generated token, with its bytes)."""
    starts, pos = [], 0
    for e in entries:
        starts.append(pos)
        pos += len(bytes(e.bytes))
    text = b"".join(bytes(e.bytes) for e in entries)
    assert text.startswith(b"<think>\n"), text[:40]
    opened = starts.index(len(b"<think>"))
    close = text.index(b"\n</think>\n\n")
    closing = max(i for i, s in enumerate(starts) if s <= close)
    return opened, closing


@pytest.mark.parametrize("effort,share", [("low", 4), ("medium", 2)])
def test_reasoning_effort_closes_the_section_at_its_budget(qwen_style, effort, share):
    client = openai.OpenAI(base_url=qwen_style.base_url + "/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(model="q", max_tokens=64, messages=HI, logprobs=True,
                                       seed=1, temperature=1.0, reasoning_effort=effort)
    entries = r.choices[0].logprobs.content
    opened, closing = _section(entries)
    assert closing - opened == 64 // share     # the budget, to the token
    message = r.choices[0].message
    assert message.model_extra["reasoning_content"] and message.content
    assert r.usage.completion_tokens == len(entries) == 64   # reasoning counts as output
    qwen_style.assert_no_leaks()


def test_budget_tokens_closes_the_section_and_the_answer_follows(qwen_style):
    client = anthropic.Anthropic(base_url=qwen_style.base_url, api_key="x", max_retries=0)
    budget, max_tokens = 1024, 1040
    kinds = []
    with client.messages.stream(model="q", max_tokens=max_tokens, messages=HI,
                                thinking={"type": "enabled", "budget_tokens": budget},
                                extra_body={"seed": 3, "temperature": 1.0}) as stream:
        for ev in stream:
            if ev.type == "content_block_delta":
                kinds.append(ev.delta.type)
        msg = stream.get_final_message()
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].signature and kinds[kinds.index("text_delta") - 1] == "signature_delta"
    # every generated token is output: the thinking, its closing tags and the answer
    assert msg.usage.output_tokens == max_tokens and msg.stop_reason == "max_tokens"
    tok = qwen_style.app.state.ctx.tokenizer
    # the answer had only what the budget left (less the closing tags): the section ran to it
    assert 0 < len(tok.encode(msg.content[1].text)) <= max_tokens - budget
    qwen_style.assert_no_leaks()


def test_effort_on_the_anthropic_route(qwen_style):
    client = anthropic.Anthropic(base_url=qwen_style.base_url, api_key="x", max_retries=0)
    msg = client.messages.create(model="q", max_tokens=48, messages=HI,
                                 output_config={"effort": "low"},
                                 extra_body={"seed": 5, "temperature": 1.0})
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.usage.output_tokens == 48
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model="q", max_tokens=48, messages=HI,
                               output_config={"effort": "extreme"})
    assert "output_config.effort" in str(err.value)
    qwen_style.assert_no_leaks()


def test_a_forced_tool_call_still_reasons_first(qwen_style):
    """A grammar-constrained reply (a forced tool call) keeps its reasoning section in front."""
    client = anthropic.Anthropic(base_url=qwen_style.base_url, api_key="x", max_retries=0)
    tool = {"name": "get_weather", "description": "Weather for a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string",
                                                                        "maxLength": 12}},
                             "required": ["city"], "additionalProperties": False}}
    msg = client.messages.create(model="q", max_tokens=200, messages=HI, tools=[tool],
                                 tool_choice={"type": "any"}, output_config={"effort": "low"},
                                 extra_body={"seed": 2, "temperature": 1.0})
    assert [b.type for b in msg.content] == ["thinking", "tool_use"]
    assert msg.content[1].name == "get_weather" and set(msg.content[1].input) == {"city"}
    assert msg.stop_reason == "tool_use"
    qwen_style.assert_no_leaks()
