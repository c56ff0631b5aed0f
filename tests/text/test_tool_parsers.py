"""Streaming tool-call parsers: same events whatever the chunking; malformed calls become text."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenfactory.text.tool_parsers import (
    HermesToolParser,
    Llama3JsonToolParser,
    TextDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallParser,
    ToolCallStart,
    detect_tool_parser,
    get_tool_parser,
    render_tool_call_text,
)


def run(parser: ToolCallParser, chunks: list[str]) -> list:
    events = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    events.extend(parser.finish())
    return events


def summarize(events: list) -> tuple[str, list[tuple[str, dict]]]:
    """(all text, [(name, arguments)]), checking the per-call event protocol on the way."""
    text = ""
    calls: list[tuple[str, dict]] = []
    open_call: dict | None = None
    for e in events:
        if isinstance(e, TextDelta):
            assert open_call is None and e.text
            text += e.text
        elif isinstance(e, ToolCallStart):
            assert open_call is None and e.index == len(calls)
            open_call = {"name": e.name, "fragments": ""}
        elif isinstance(e, ToolCallArgsDelta):
            assert open_call is not None and e.index == len(calls)
            open_call["fragments"] += e.json_fragment
        elif isinstance(e, ToolCallEnd):
            assert open_call is not None and e.index == len(calls)
            assert json.loads(open_call["fragments"]) == e.arguments
            calls.append((open_call["name"], e.arguments))
            open_call = None
    assert open_call is None
    return text, calls


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    pieces, prev = [], 0
    for p in points:
        pieces.append(text[prev:p])
        prev = p
    pieces.append(text[prev:])
    return pieces


ARGS = {"city": "Zürich", "nested": {"list": [1, 2, {"s": "a}b\"c"}]}, "empty": {}}
HERMES_CASES = [
    # (model text, expected text, expected calls)
    ("Just text, no calls.\n", "Just text, no calls.\n", []),
    (render_tool_call_text("get_weather", ARGS, "hermes"), "", [("get_weather", ARGS)]),
    ("Let me check.\n" + render_tool_call_text("f", {"a": 1}, "hermes") + "\n"
     + render_tool_call_text("g", {}, "hermes") + "\n", "Let me check.", [("f", {"a": 1}), ("g", {})]),
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>', '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>', []),
    ('<tool_call>{"arguments": {}}</tool_call> ok', '<tool_call>{"arguments": {}}</tool_call> ok', []),
    ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', '<tool_call>{"name": "f", "arguments": [1]}</tool_call>', []),
    ('<tool_call>{"name": "f", "arguments": "{\\"x\\": 2}"}</tool_call>', "", [("f", {"x": 2})]),
    ('a <tool_ca b <tool_call', "a <tool_ca b <tool_call", []),
    ('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n', "", [("f", {"x": 1})]),  # stopped before the end tag
    ('<tool_call>\n{"name": "f", "argu', '<tool_call>\n{"name": "f", "argu', []),
    ("x < y and <b>bold</b>", "x < y and <b>bold</b>", []),
]


@pytest.mark.parametrize("text,expected_text,expected_calls", HERMES_CASES)
def test_hermes_char_by_char_and_whole(text: str, expected_text: str, expected_calls: list) -> None:
    for chunks in (list(text), [text]):
        got_text, calls = summarize(run(HermesToolParser(), chunks))
        assert got_text == expected_text
        assert calls == expected_calls


@settings(max_examples=150, deadline=None)
@given(case=st.sampled_from(HERMES_CASES), cuts=st.lists(st.integers(0, 500), max_size=8))
def test_hermes_random_chunking(case, cuts) -> None:
    text, expected_text, expected_calls = case
    assert summarize(run(HermesToolParser(), split(text, cuts))) == (expected_text, expected_calls)


def test_hermes_streams_text_before_marker() -> None:
    parser = HermesToolParser()
    assert parser.feed("Hello wor") == [TextDelta("Hello wor")]
    assert parser.feed("ld <tool") == [TextDelta("ld")]  # " <tool": the space and the marker start are held
    events = parser.feed('_call>{"name": "f", "arguments": {}}</tool_call>')
    assert events == [ToolCallStart(0, "f"), ToolCallArgsDelta(0, "{}"), ToolCallEnd(0, {})]
    assert parser.finish() == []


LLAMA_CASES = [
    (render_tool_call_text("get_weather", ARGS, "llama3_json"), "", [("get_weather", ARGS)]),
    ('<|python_tag|>{"name": "f", "parameters": {"a": 1}}', "", [("f", {"a": 1})]),
    ('  {"name": "f", "arguments": {"a": "x;y"}}; {"name": "g", "parameters": {}}', "", [("f", {"a": "x;y"}), ("g", {})]),
    ("The answer is {not json}.", "The answer is {not json}.", []),
    ('{"a": 1, "b": [1, 2]}', '{"a": 1, "b": [1, 2]}', []),  # JSON but not a call
    ('{"name": "f", "parameters": {"a": 1', '{"name": "f", "parameters": {"a": 1', []),
    ('{"name": "f", "parameters": 3}', '{"name": "f", "parameters": 3}', []),
    ('Sure. <|python_tag|>{"name": "f", "parameters": {}}', "Sure.", [("f", {})]),
    ('<|python_tag|>print("hi")', '<|python_tag|>print("hi")', []),
    ('{"name": "f", "parameters": {}} and some trailing words', " and some trailing words", [("f", {})]),
    ("plain <|python", "plain <|python", []),
    ("", "", []),
]


@pytest.mark.parametrize("text,expected_text,expected_calls", LLAMA_CASES)
def test_llama3_json_char_by_char_and_whole(text: str, expected_text: str, expected_calls: list) -> None:
    for chunks in (list(text), [text]):
        assert summarize(run(Llama3JsonToolParser(), chunks)) == (expected_text, expected_calls)


@settings(max_examples=150, deadline=None)
@given(case=st.sampled_from(LLAMA_CASES), cuts=st.lists(st.integers(0, 500), max_size=8))
def test_llama3_json_random_chunking(case, cuts) -> None:
    text, expected_text, expected_calls = case
    assert summarize(run(Llama3JsonToolParser(), split(text, cuts))) == (expected_text, expected_calls)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=100, deadline=None)
@given(
    parser_name=st.sampled_from(["hermes", "llama3_json"]),
    calls=st.lists(st.tuples(st.from_regex(r"[a-z_]{1,10}", fullmatch=True),
                             st.dictionaries(st.text(max_size=6), json_values, max_size=3)), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 1000), max_size=10),
)
def test_rendered_calls_parse_back(parser_name: str, calls, cuts) -> None:
    sep = "\n" if parser_name == "hermes" else "; "
    text = sep.join(render_tool_call_text(n, a, parser_name) for n, a in calls)
    got_text, got_calls = summarize(run(get_tool_parser(parser_name)(), split(text, cuts)))
    assert got_text == ""
    assert got_calls == [(n, a) for n, a in calls]


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet='<>tool_cal/{}"name:; \n|python', max_size=60), cuts=st.lists(st.integers(0, 100), max_size=6))
def test_garbage_never_raises_and_chunking_does_not_matter(text: str, cuts) -> None:
    for cls in (HermesToolParser, Llama3JsonToolParser):
        whole = summarize(run(cls(), [text]))
        assert summarize(run(cls(), split(text, cuts))) == whole
        if not whole[1]:  # no calls: the text is preserved exactly
            assert whole[0] == text


def test_registry_and_detection() -> None:
    assert get_tool_parser("hermes") is HermesToolParser
    assert get_tool_parser("llama3_json") is Llama3JsonToolParser
    with pytest.raises(ValueError, match="available"):
        get_tool_parser("nope")
    assert detect_tool_parser("... <tool_call> ...") == "hermes"
    assert detect_tool_parser("{{ '<|python_tag|>' }}") == "llama3_json"
    assert detect_tool_parser("{%- if 'tool_calls' in message %}{{ '\"parameters\": ' }}") == "llama3_json"
    assert detect_tool_parser("{{ messages }}") is None
    assert detect_tool_parser(None) is None


def test_detect_on_test_templates(template_dirs) -> None:
    from tokenfactory.text.tokenizer import Tokenizer

    assert detect_tool_parser(Tokenizer.from_dir(template_dirs["demo"]).chat_template) == "hermes"
    assert detect_tool_parser(Tokenizer.from_dir(template_dirs["hermes"]).chat_template) == "hermes"
    assert detect_tool_parser(Tokenizer.from_dir(template_dirs["llama31"]).chat_template) == "llama3_json"


def test_render_tool_call_text_formats() -> None:
    assert render_tool_call_text("f", {"a": "é"}, "hermes") == '<tool_call>\n{"name": "f", "arguments": {"a": "é"}}\n</tool_call>'
    assert render_tool_call_text("f", {"a": 1}, "llama3_json") == '{"name": "f", "parameters": {"a": 1}}'
    with pytest.raises(ValueError):
        render_tool_call_text("f", {}, "xml")


def test_feed_after_finish_is_an_error() -> None:
    parser = HermesToolParser()
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")


# ------------------------------------------------------------ streamed arguments (grammar)
@settings(max_examples=100, deadline=None)
@given(
    lead=st.text(alphabet="ab \n.", max_size=8),
    calls=st.lists(st.tuples(st.from_regex(r"[a-z_]{1,10}", fullmatch=True),
                             st.dictionaries(st.text(max_size=6), json_values, max_size=3)),
                   min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 1000), max_size=12),
)
def test_streamed_arguments_reassemble_for_any_chunking(lead: str, calls, cuts) -> None:
    """With stream_arguments, a call's fragments arrive as the text does (one per chunk that
    carries argument bytes), every concatenation so far is a prefix of the final JSON, and the
    whole equals the call's arguments, whatever the chunking."""
    text = lead + "\n".join(render_tool_call_text(n, a, "hermes") for n, a in calls)
    parser = HermesToolParser(stream_arguments=True)
    events = run(parser, split(text, cuts))
    got_text, got_calls = summarize(events)
    assert got_calls == [(n, a) for n, a in calls]
    assert got_text == lead.rstrip()
    for i, (name, args) in enumerate(calls):
        frags = [e.json_fragment for e in events if isinstance(e, ToolCallArgsDelta) and e.index == i]
        assert json.loads("".join(frags)) == args
        assert "".join(frags) == json.dumps(args, ensure_ascii=False)
    # the start of a call comes before its first fragment, its end after the last
    kinds = [type(e).__name__ for e in events if not isinstance(e, TextDelta)]
    assert kinds[0] == "ToolCallStart" and kinds[-1] == "ToolCallEnd"


def test_streamed_arguments_arrive_while_the_call_is_generated() -> None:
    parser = HermesToolParser(stream_arguments=True)
    head = '<tool_call>\n{"name": "w", "arguments": '
    assert parser.feed(head) == []   # the call starts once its arguments do
    assert parser.feed('{"city": "Pa') == [ToolCallStart(0, "w"), ToolCallArgsDelta(0, '{"city": "Pa')]
    assert parser.feed('ris"}') == [ToolCallArgsDelta(0, 'ris"}')]
    assert parser.feed("}\n</tool_call>") == [ToolCallEnd(0, {"city": "Paris"})]


def test_a_streamed_call_cut_short_ends_with_what_parses() -> None:
    parser = HermesToolParser(stream_arguments=True)
    events = run(parser, ['<tool_call>\n{"name": "w", "arguments": {"city": "Pa'])
    assert events[-1] == ToolCallEnd(0, {})   # max_tokens cut the arguments
    assert "".join(e.json_fragment for e in events if isinstance(e, ToolCallArgsDelta)) \
        == '{"city": "Pa'


# ------------------------------------------------------------ tool-call grammars
WEATHER_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city"],
                  "properties": {"city": {"type": "string"},
                                 "days": {"type": "integer", "minimum": 1, "maximum": 7}}}


def _accepts(tokenizer, lark: str, text: str) -> bool:
    from tokenfactory.engine.sampling_params import StructuredOutput
    from tokenfactory.text.grammar import compile_structured_output
    m = compile_structured_output(tokenizer, StructuredOutput(lark=lark)).matcher()
    return all(m.accept(t) for t in tokenizer.encode(text)) and m.raw.is_accepting()


@pytest.mark.parametrize("choice, name, text, ok", [
    ("auto", None, "Just text, no call.", True),
    ("auto", None, "Sure.\n" + render_tool_call_text("weather", {"city": "Oslo"}, "hermes"), True),
    ("auto", None, render_tool_call_text("weather", {"town": "Oslo"}, "hermes"), False),
    ("auto", None, render_tool_call_text("weather", {"city": "Oslo", "days": 9}, "hermes"), False),
    ("auto", None, render_tool_call_text("clock", {"tz": 1}, "hermes") + "\n"
     + render_tool_call_text("weather", {"city": "Oslo", "days": 2}, "hermes"), True),
    ("auto", None, render_tool_call_text("nope", {}, "hermes"), False),
    ("required", None, "Just text", False),
    ("required", None, render_tool_call_text("clock", {}, "hermes"), True),
    ("named", "weather", render_tool_call_text("clock", {}, "hermes"), False),
    ("named", "weather", render_tool_call_text("weather", {"city": "Rome"}, "hermes"), True),
    # compact JSON is not how the template renders a call: refused (byte-identical history)
    ("named", "weather", '<tool_call>\n{"name": "weather", "arguments": {"city":"Rome"}}\n'
                         '</tool_call>', False),
])
def test_tool_call_grammar_hermes(demo_tokenizer, choice, name, text, ok) -> None:
    """On the demo tokenizer <tool_call> is a special token: the grammar names it by id."""
    from tokenfactory.text.grammar import special_tokens
    from tokenfactory.text.tool_parsers import tool_call_grammar
    assert "<tool_call>" in special_tokens(demo_tokenizer)
    tools = [("weather", WEATHER_SCHEMA, True), ("clock", None, False)]
    lark = tool_call_grammar(tools, "hermes", choice=choice, name=name,
                             special_tokens=special_tokens(demo_tokenizer))
    assert _accepts(demo_tokenizer, lark, text) is ok


def test_tool_call_grammar_without_special_markers_and_llama3(demo_tokenizer) -> None:
    """SmolLM2's vocabulary has no <tool_call> token: the marker is matched as text."""
    from tokenfactory.model.default import default_model_path
    from tokenfactory.text.grammar import special_tokens
    from tokenfactory.text.tokenizer import Tokenizer
    from tokenfactory.text.tool_parsers import tool_call_grammar
    smol = Tokenizer.from_pretrained(default_model_path())
    assert "<tool_call>" not in special_tokens(smol)
    tools = [("weather", WEATHER_SCHEMA, True)]
    lark = tool_call_grammar(tools, "hermes", parallel=False, special_tokens=special_tokens(smol))
    call = render_tool_call_text("weather", {"city": "Oslo"}, "hermes")
    assert "suffix" in lark and _accepts(smol, lark, "Hi " + call)
    assert _accepts(smol, lark, "No call <tool_ here")
    assert not _accepts(smol, lark, call + "\n" + call)   # parallel calls off
    assert tool_call_grammar(tools, "llama3_json") is None          # no marker to end text at
    lark = tool_call_grammar(tools, "llama3_json", choice="named", name="weather")
    assert _accepts(demo_tokenizer, lark, render_tool_call_text("weather", {"city": "X"},
                                                                "llama3_json"))


def test_generic_tools_rewrite_the_conversation() -> None:
    from tokenfactory.text.chat_template import generic_tools_text, with_generic_tools
    tools = [{"type": "function", "function": {"name": "weather", "description": "Weather",
                                               "parameters": WEATHER_SCHEMA}}]
    chat = [{"role": "user", "content": "Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    out = with_generic_tools(chat, tools)
    assert out[0] == {"role": "system", "content": generic_tools_text(tools)}
    assert json.loads(out[0]["content"].splitlines()[1])["parameters"] == WEATHER_SCHEMA
    assert out[2] == {"role": "assistant",
                      "content": render_tool_call_text("weather", {"city": "Oslo"}, "hermes")}
    assert out[3] == {"role": "user", "content": "<tool_result>\nsunny\n</tool_result>"}
    with_system = with_generic_tools([{"role": "system", "content": "Be brief."}, *chat], tools)
    assert with_system[0]["content"].startswith("Be brief.\n\n" + generic_tools_text(tools)[:20])
    assert chat[1]["tool_calls"]   # the input is not modified


def test_reply_parser_composes_calls_one_call_and_reasoning() -> None:
    """reply_parser builds what both APIs feed a reply through: nothing when nothing is
    parsed; the format's parser; only its first call when one_call; a leading <think>
    section split off (as thinking, before the calls) when reasoning."""
    from tokenfactory.text.tool_parsers import ThinkingDelta, ThinkingEnd, reply_parser

    two = (render_tool_call_text("f", {"a": 1}, "hermes") + "\n"
           + render_tool_call_text("g", {}, "hermes"))
    assert reply_parser(None) is None
    assert summarize(run(reply_parser("hermes"), [two])) == ("", [("f", {"a": 1}), ("g", {})])
    assert summarize(run(reply_parser("hermes", one_call=True), [two])) == ("", [("f", {"a": 1})])
    events = run(reply_parser("hermes", reasoning=True), ["<think>\nhm\n</think>\n\n", two])
    thoughts = [e for e in events if isinstance(e, (ThinkingDelta, ThinkingEnd))]
    assert thoughts == [ThinkingDelta("hm"), ThinkingEnd()]
    rest = [e for e in events if not isinstance(e, (ThinkingDelta, ThinkingEnd))]
    assert summarize(rest) == ("", [("f", {"a": 1}), ("g", {})])
    # the prompt opened the section: the reply starts inside it; no tool parser: text passes
    events = run(reply_parser(None, reasoning=True, inside=True), ["hm</think>ok"])
    assert events == [ThinkingDelta("hm"), ThinkingEnd(), TextDelta("ok")]
