"""Chat templates render byte for byte like transformers' apply_chat_template(tokenize=False)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenfactory.text.chat_template import render_chat_template
from tokenfactory.text.tokenizer import ChatTemplateError, Tokenizer
from tokenfactory.text.tool_parsers import render_tool_call_text

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city. Returns <html>-free text & numbers.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
SEARCH_TOOL = {"type": "function", "function": {"name": "search", "description": "Search the web for 'q'.",
                                                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}


def call(name: str, args: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": args}}


CONVERSATIONS = {
    "single_user": ([{"role": "user", "content": "Hello there!"}], None),
    "system_user_assistant": (
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "Ünïcødé ✓ 日本 <b>&</b>"},
        ],
        None,
    ),
    "tool_round_trip": (
        [
            {"role": "system", "content": "Use tools when useful."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call("get_weather", {"city": "Paris", "unit": "c"})]},
            {"role": "tool", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "It is 21°C in Paris."},
        ],
        [WEATHER_TOOL, SEARCH_TOOL],
    ),
    "system_mid_conversation_and_blocks": (
        [
            {"role": "user", "content": [{"type": "text", "text": "Add dark mode."}]},
            {"role": "system", "content": "Reminder: be brief."},
            {"role": "assistant", "content": "Done."},
            {"role": "user", "content": "Thanks"},
        ],
        None,
    ),
    "tools_no_system": (
        [{"role": "user", "content": "Find 'café' recipes"}],
        [SEARCH_TOOL],
    ),
}
# Conversations some templates refuse or render differently on purpose are skipped per template.
MULTI_CALL = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "Checking both.", "tool_calls": [call("get_weather", {"city": "Paris"}),
                                                                       call("get_weather", {"city": "Rome"})]},
    {"role": "tool", "content": "18"},
    {"role": "tool", "content": "25"},
]


@pytest.fixture(scope="module")
def pairs(template_dirs: dict[str, Path]):
    import transformers
    return {
        name: (Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(str(path)))
        for name, path in template_dirs.items()
    }


def hf_render(hf, messages, tools, **kwargs) -> str:
    return hf.apply_chat_template(messages, tools=tools, tokenize=False, **kwargs)


# Only the demo template takes content blocks and system turns anywhere; the others are not
# asked to render that conversation.
TEMPLATE_CASES = [(t, c) for t in ("demo", "llama31", "hermes") for c in sorted(CONVERSATIONS)
                  if t == "demo" or c != "system_mid_conversation_and_blocks"]


@pytest.mark.parametrize("template,conversation", TEMPLATE_CASES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers(pairs, template: str, conversation: str, add_generation_prompt: bool) -> None:
    ours, hf = pairs[template]
    messages, tools = CONVERSATIONS[conversation]
    kwargs = {"date_string": "26 Jul 2024"} if template == "llama31" else {}
    expected = hf_render(hf, messages, tools, add_generation_prompt=add_generation_prompt, **kwargs)
    got = ours.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs)
    assert got == expected


@pytest.mark.parametrize("template", ["demo", "hermes"])
def test_multiple_calls_and_tool_results_match(pairs, template: str) -> None:
    ours, hf = pairs[template]
    tools = [WEATHER_TOOL]
    assert ours.apply_chat_template(MULTI_CALL, tools=tools) == hf_render(hf, MULTI_CALL, tools, add_generation_prompt=True)


@pytest.mark.parametrize("template", ["demo", "llama31", "hermes"])
def test_continue_final_message_matches(pairs, template: str) -> None:
    ours, hf = pairs[template]
    messages = [{"role": "user", "content": "Write a haiku"}, {"role": "assistant", "content": "Autumn moon  "}]
    kwargs = {"date_string": "26 Jul 2024"} if template == "llama31" else {}
    expected = hf_render(hf, messages, None, continue_final_message=True, **kwargs)
    got = ours.apply_chat_template(messages, continue_final_message=True, **kwargs)
    assert got == expected
    assert got.rstrip().endswith("Autumn moon")


def test_llama_template_tools_in_system_and_errors(pairs) -> None:
    ours, hf = pairs["llama31"]
    messages, tools = CONVERSATIONS["tool_round_trip"]
    kwargs = {"date_string": "1 Jan 2025", "tools_in_user_message": False}
    got = ours.apply_chat_template(messages, tools=tools, **kwargs)
    assert got == hf_render(hf, messages, tools, add_generation_prompt=True, **kwargs)
    assert json.dumps(WEATHER_TOOL, indent=4, ensure_ascii=False) in got  # tojson(indent=4)
    with pytest.raises(ChatTemplateError, match="Only one tool call"):
        ours.apply_chat_template(MULTI_CALL, tools=tools, date_string="x")


def test_strftime_now_and_raise_exception() -> None:
    out = render_chat_template("{{ strftime_now('%Y') }}", [{"role": "user", "content": ""}])
    assert out.isdigit() and len(out) == 4
    with pytest.raises(ChatTemplateError, match="nope"):
        render_chat_template("{{ raise_exception('nope') }}", [{"role": "user", "content": ""}])
    with pytest.raises(ChatTemplateError, match="syntax"):
        render_chat_template("{% if %}", [{"role": "user", "content": ""}])


def test_tojson_does_not_escape_html_and_keeps_unicode() -> None:
    out = render_chat_template("{{ messages[0] | tojson }}|{{ {'a': [1]} | tojson(indent=2) }}",
                               [{"role": "user", "content": "<b>é&'</b>"}])
    assert out == '{"role": "user", "content": "<b>é&\'</b>"}|{\n  "a": [\n    1\n  ]\n}'


def test_sandbox_blocks_internals() -> None:
    with pytest.raises(Exception):
        render_chat_template("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}",
                             [{"role": "user", "content": ""}])
    with pytest.raises(ChatTemplateError):  # immutable: templates cannot mutate the caller's messages
        render_chat_template("{{ messages.append(1) }}", [{"role": "user", "content": ""}])


def test_empty_conversation_is_an_error(demo_tokenizer: Tokenizer) -> None:
    with pytest.raises(ChatTemplateError, match="empty"):
        demo_tokenizer.apply_chat_template([])


def test_none_valued_keys_are_dropped(demo_tokenizer: Tokenizer) -> None:
    with_none = demo_tokenizer.apply_chat_template([{"role": "user", "content": "x"},
                                                    {"role": "assistant", "content": None, "tool_calls": None}])
    assert "None" not in with_none


def test_content_blocks_render_like_strings(demo_tokenizer: Tokenizer) -> None:
    a = demo_tokenizer.apply_chat_template([{"role": "user", "content": "hi there"}])
    b = demo_tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}]
    )
    assert a == b


# ----------------------------------------------------------------------------- demo template stability

_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
_args = st.dictionaries(st.sampled_from(["city", "q", "n"]), st.one_of(_text, st.integers()), max_size=2)
_message = st.one_of(
    st.builds(lambda c: {"role": "user", "content": c}, _text),
    st.builds(lambda c: {"role": "system", "content": c}, _text),
    st.builds(lambda c: {"role": "assistant", "content": c}, _text),
    st.builds(lambda c, a: {"role": "assistant", "content": c, "tool_calls": [call("get_weather", a)]}, _text, _args),
    st.builds(lambda c: {"role": "tool", "content": c}, _text),
)


@settings(max_examples=80, deadline=None)
@given(messages=st.lists(_message, min_size=1, max_size=7), use_tools=st.booleans())
def test_demo_template_is_prefix_stable(demo_tokenizer: Tokenizer, messages: list[dict], use_tools: bool) -> None:
    tools = [WEATHER_TOOL] if use_tools else None
    full = demo_tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=False)
    for k in range(1, len(messages)):
        prefix = demo_tokenizer.apply_chat_template(messages[:k], tools=tools, add_generation_prompt=False)
        assert full.startswith(prefix)
        with_prompt = demo_tokenizer.apply_chat_template(messages[:k], tools=tools, add_generation_prompt=True)
        if messages[k]["role"] == "assistant":
            assert full.startswith(with_prompt)


def test_model_output_round_trips_through_demo_template(demo_tokenizer: Tokenizer) -> None:
    """What the model writes for a call is exactly what the template renders for it next turn."""
    messages = [{"role": "user", "content": "Weather?"}]
    prompt = demo_tokenizer.apply_chat_template(messages, tools=[WEATHER_TOOL])
    for content in ("", "Let me check."):
        calls = [("get_weather", {"city": "Zürich"}), ("get_weather", {"city": "Oslo", "unit": "c"})]
        generated = (content + "\n" if content else "") + "\n".join(
            render_tool_call_text(n, a, "hermes") for n, a in calls
        )
        assistant = {"role": "assistant", "content": content, "tool_calls": [call(n, a) for n, a in calls]}
        rendered = demo_tokenizer.apply_chat_template(messages + [assistant], tools=[WEATHER_TOOL],
                                                      add_generation_prompt=False)
        assert rendered == prompt + generated + "<|im_end|>\n"
