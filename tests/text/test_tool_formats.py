"""Mistral ([TOOL_CALLS], both forms) and Qwen3-Coder (XML) tool-call parsers: the same events
whatever the chunking, argument fragments that concatenate to the final arguments, malformed
calls back as text, selection from the chat template, and grammars for the Mistral forms."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenfactory.text.tool_formats import (MistralArgsToolParser, MistralToolParser,
                                            Qwen3CoderToolParser, typed_value)
from tokenfactory.text.tool_parsers import (ToolCallArgsDelta, ToolCallStart,
                                            detect_tool_parser, get_tool_parser,
                                            render_tool_call_text)

from .test_tool_parsers import json_values, run, split, summarize

ARGS = {"city": "Zürich", "nested": {"list": [1, 2, {"s": "a}b\"c"}]}, "empty": {}}
MISTRAL_CASES = [
    # (model text, expected text, expected calls)
    ("No call here.", "No call here.", []),
    ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]', "",
     [("get_weather", {"city": "Paris"})]),
    ('[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": '
     + json.dumps(ARGS) + '}]', "", [("a", {"x": 1}), ("b", ARGS)]),
    ('Let me look.[TOOL_CALLS][{"name": "a", "arguments": {}, "id": "abc123xyz"}]',
     "Let me look.", [("a", {})]),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', "", [("get_weather", {"city": "Paris"})]),
    ('[TOOL_CALLS][{"name": "a", "arguments": {}}', "", [("a", {})]),   # list never closed
    ("[TOOL_CALLS][", "[TOOL_CALLS][", []),
    ('[TOOL_CALLS]a[ARGS]{"x": 1}[TOOL_CALLS]b[CALL_ID]k3y[ARGS]' + json.dumps(ARGS), "",
     [("a", {"x": 1}), ("b", ARGS)]),
    # malformed: back as text, byte for byte
    ('[TOOL_CALLS][{"name": "a", "arguments": {x: 1}}]', '[TOOL_CALLS][{"name": "a", '
     '"arguments": {x: 1}}]', []),
    ("[TOOL_CALLS]not a call at all\nsee?", "[TOOL_CALLS]not a call at all\nsee?", []),
]


@pytest.mark.parametrize("text,expected_text,expected_calls", MISTRAL_CASES)
@pytest.mark.parametrize("cls", [MistralToolParser, MistralArgsToolParser])
def test_mistral_char_by_char_and_whole(cls, text, expected_text, expected_calls) -> None:
    # (arguments stream only under a grammar, which never lets a malformed call through)
    for chunks in ([text], list(text)):
        for stream in (False, True) if expected_calls else (False,):
            got_text, got_calls = summarize(run(cls(stream_arguments=stream), chunks))
            assert (got_text, got_calls) == (expected_text, expected_calls)


@settings(max_examples=80, deadline=None)
@given(parser_name=st.sampled_from(["mistral", "mistral_args"]),
       lead=st.sampled_from(["", "Sure. "]),
       calls=st.lists(st.tuples(st.from_regex(r"[a-z_]{1,10}", fullmatch=True),
                                st.dictionaries(st.text(max_size=6), json_values, max_size=3)),
                      min_size=1, max_size=3),
       cuts=st.lists(st.integers(0, 1000), max_size=10),
       stream=st.booleans())
def test_mistral_rendered_calls_parse_back(parser_name, lead, calls, cuts, stream) -> None:
    """What render_tool_call_text writes (and a grammar forces) parses back, in any chunking;
    streamed argument fragments concatenate to each call's arguments (summarize checks)."""
    text = lead + "".join(render_tool_call_text(n, a, parser_name) for n, a in calls)
    parser = get_tool_parser(parser_name)(stream_arguments=stream)
    got_text, got_calls = summarize(run(parser, split(text, cuts)))
    assert got_text == lead.rstrip() and got_calls == [(n, a) for n, a in calls]


def test_mistral_streamed_arguments_arrive_while_generated() -> None:
    parser = MistralArgsToolParser(stream_arguments=True)
    events = parser.feed('[TOOL_CALLS]get_weather[ARGS]{"city": "Par')
    assert isinstance(events[0], ToolCallStart) and events[0].name == "get_weather"
    assert "".join(e.json_fragment for e in events if isinstance(e, ToolCallArgsDelta)) \
        == '{"city": "Par'


QWEN_TOOLS = {"get_weather": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
    "hours": {"type": "array"}, "where": {"type": ["object", "null"]}}}}
QWEN_CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nSan <Francisco>\n"
             "</parameter>\n<parameter=days>\n3\n</parameter>\n<parameter=metric>\ntrue\n"
             "</parameter>\n<parameter=hours>\n[1, 2]\n</parameter>\n<parameter=where>\n"
             "{\"lat\": 1.5}\n</parameter>\n</function>\n</tool_call>")
QWEN_ARGS = {"city": "San <Francisco>", "days": 3, "metric": True, "hours": [1, 2],
             "where": {"lat": 1.5}}
QWEN_CASES = [
    ("Plain answer.", "Plain answer.", []),
    (QWEN_CALL, "", [("get_weather", QWEN_ARGS)]),
    ("Checking.\n" + QWEN_CALL + "\n" + QWEN_CALL.replace("San <Francisco>", "Oslo\nnorth"),
     "Checking.", [("get_weather", QWEN_ARGS), ("get_weather", dict(QWEN_ARGS,
                                                                     city="Oslo\nnorth"))]),
    ("<tool_call>\n<function=ping>\n</function>\n</tool_call>", "", [("ping", {})]),
    # a value that does not fit its type stays text; an unknown tool's values are text
    ("<tool_call>\n<function=get_weather>\n<parameter=days>\nthree\n</parameter>\n"
     "</function>\n</tool_call>", "", [("get_weather", {"days": "three"})]),
    ("<tool_call>\n<function=other>\n<parameter=n>\n5\n</parameter>\n</function>\n"
     "</tool_call>", "", [("other", {"n": "5"})]),
    ("<tool_call> not xml </tool_call>", "<tool_call> not xml </tool_call>", []),
]


@pytest.mark.parametrize("text,expected_text,expected_calls", QWEN_CASES)
def test_qwen3_coder_char_by_char_and_whole(text, expected_text, expected_calls) -> None:
    for chunks in ([text], list(text)):
        for stream in (False, True):
            events = run(Qwen3CoderToolParser(stream_arguments=stream, tools=QWEN_TOOLS),
                         chunks)
            got_text, got_calls = summarize(events)
            assert (got_text, got_calls) == (expected_text, expected_calls)
            # the fragments are json.dumps(arguments) exactly, cut into pieces
            frags = "".join(e.json_fragment for e in events if isinstance(e, ToolCallArgsDelta))
            assert frags == "".join(json.dumps(a, ensure_ascii=False) for _, a in got_calls)


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(0, len(QWEN_CALL)), max_size=12), stream=st.booleans())
def test_qwen3_coder_random_chunking(cuts, stream) -> None:
    events = run(Qwen3CoderToolParser(stream_arguments=stream, tools=QWEN_TOOLS),
                 split(QWEN_CALL, cuts))
    assert summarize(events) == ("", [("get_weather", QWEN_ARGS)])


def test_qwen3_coder_string_values_stream_piece_by_piece() -> None:
    parser = Qwen3CoderToolParser(stream_arguments=True, tools=QWEN_TOOLS)
    events = parser.feed("<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Fr")
    assert "".join(e.json_fragment for e in events if isinstance(e, ToolCallArgsDelta)) \
        == '{"city": "San Fr'


def test_typed_values() -> None:
    assert typed_value("7", {"type": "integer"}) == 7
    assert typed_value("7.5", {"type": "integer"}) == "7.5"
    assert typed_value("7.5", {"type": "number"}) == 7.5
    assert typed_value("null", {"type": ["string", "null"]}) is None
    assert typed_value(" x ", {"type": "string"}) == " x "
    assert typed_value("{\"a\": 1}", {"anyOf": [{"type": "object"}]}) == {"a": 1}


MISTRAL_V3_TEMPLATE = ("{%- for m in messages %}{%- if m.tool_calls %}[TOOL_CALLS] "
                       "{{ m.tool_calls | tojson }}{%- endif %}{%- endfor %}")
MISTRAL_V11_TEMPLATE = ("{%- for m in messages %}{%- for c in m.tool_calls or [] %}[TOOL_CALLS]"
                        "{{ c.function.name }}[ARGS]{{ c.function.arguments | tojson }}"
                        "{%- endfor %}{%- endfor %}")
QWEN3_CODER_TEMPLATE = ("{%- for c in m.tool_calls %}<tool_call>\n<function={{ c.name }}>\n"
                        "{%- for k, v in c.arguments.items() %}<parameter={{ k }}>\n{{ v }}\n"
                        "</parameter>\n{%- endfor %}</function>\n</tool_call>{%- endfor %}")


def test_selection_by_template() -> None:
    assert detect_tool_parser(MISTRAL_V3_TEMPLATE) == "mistral"
    assert detect_tool_parser(MISTRAL_V11_TEMPLATE) == "mistral_args"
    assert detect_tool_parser(QWEN3_CODER_TEMPLATE) == "qwen3_coder"
    assert get_tool_parser("qwen3_coder") is Qwen3CoderToolParser


def test_rendering_matches_the_templates() -> None:
    """render_tool_call_text writes a call as these template fragments render it back."""
    from tokenfactory.text.chat_template import render_chat_template
    call = {"type": "function", "function": {"name": "f", "arguments": {"a": "é", "n": 1}}}
    msgs = [{"role": "assistant", "content": "", "tool_calls": [call]}]
    assert render_chat_template(MISTRAL_V11_TEMPLATE, msgs) \
        == render_tool_call_text("f", {"a": "é", "n": 1}, "mistral_args")
    assert render_tool_call_text("f", {"a": "x y", "n": 1}, "qwen3_coder") == (
        "<tool_call>\n<function=f>\n<parameter=a>\nx y\n</parameter>\n<parameter=n>\n1\n"
        "</parameter>\n</function>\n</tool_call>")


def _accepts(tokenizer, lark: str, text: str) -> bool:
    from tokenfactory.engine.sampling_params import StructuredOutput
    from tokenfactory.text.grammar import compile_structured_output
    m = compile_structured_output(tokenizer, StructuredOutput(lark=lark)).matcher()
    return all(m.accept(t) for t in tokenizer.encode(text)) and m.raw.is_accepting()


@pytest.mark.parametrize("fmt", ["mistral", "mistral_args"])
def test_mistral_grammars(demo_tokenizer, fmt) -> None:
    from tokenfactory.text.tool_parsers import tool_call_grammar
    schema = {"type": "object", "properties": {"city": {"type": "string"}},
              "required": ["city"], "additionalProperties": False}
    tools = [("weather", schema, True)]
    one = render_tool_call_text("weather", {"city": "Oslo"}, fmt)
    for parallel, ok in ((True, True), (False, False)):
        lark = tool_call_grammar(tools, fmt, parallel=parallel)
        assert _accepts(demo_tokenizer, lark, "Sure." + one)
        assert _accepts(demo_tokenizer, lark, "Sure." + one + one) is ok
    assert not _accepts(demo_tokenizer, tool_call_grammar(tools, fmt, choice="required"),
                        render_tool_call_text("weather", {"town": "Oslo"}, fmt))



QWEN_SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "unit": {"enum": ["c", "f"]},
    "opts": {"type": "object", "properties": {"a": {"type": "boolean"}},
             "additionalProperties": False}},
    "required": ["city"], "additionalProperties": False}


@pytest.mark.parametrize("args, ok", [
    ({"city": "Oslo"}, True),
    ({"city": "Oslo\n  Norway <b>", "days": 3, "unit": "f", "opts": {"a": True}}, True),
    ({"days": 3}, False),                              # required city missing
    ({"city": "x", "days": "three"}, False),           # not an integer
    ({"city": "x", "unit": "k"}, False),               # not in the enum
    ({"city": "x", "extra": 1}, False),                # not a parameter of the tool
    ({"city": "x", "opts": {"a": 1}}, False),          # nested schema held too
    ({"city": "a</parameter>b"}, False),               # a raw value cannot end early
])
def test_qwen3_coder_grammar_holds_calls_to_the_schema(demo_tokenizer, args, ok) -> None:
    """The grammar admits exactly the rendered calls whose values fit the schema, and what it
    admits parses back (the same parser as a free call) to those arguments."""
    from tokenfactory.text.grammar import special_tokens
    from tokenfactory.text.tool_parsers import tool_call_grammar
    tools = [("weather", QWEN_SCHEMA, True), ("anything", None, False)]
    text = render_tool_call_text("weather", args, "qwen3_coder")
    specials = special_tokens(demo_tokenizer)
    for choice, name in (("required", None), ("named", "weather"), ("auto", None)):
        lark = tool_call_grammar(tools, "qwen3_coder", choice=choice, name=name,
                                 special_tokens=specials)
        assert _accepts(demo_tokenizer, lark, text) is ok, choice
    if ok:
        text_out, calls = summarize(run(Qwen3CoderToolParser(
            stream_arguments=True, tools={"weather": QWEN_SCHEMA}), [text]))
        assert calls == [("weather", args)] and text_out == ""


def test_qwen3_coder_grammar_choices(demo_tokenizer) -> None:
    from tokenfactory.text.grammar import special_tokens
    from tokenfactory.text.tool_parsers import tool_call_grammar
    tools = [("weather", QWEN_SCHEMA, False), ("anything", None, False)]
    specials = special_tokens(demo_tokenizer)
    one = render_tool_call_text("weather", {"city": "a"}, "qwen3_coder")
    free = render_tool_call_text("anything", {"z": "any <b> text", "n": "1"}, "qwen3_coder")

    def lark(**kw):
        return tool_call_grammar(tools, "qwen3_coder", special_tokens=specials, **kw)
    assert _accepts(demo_tokenizer, lark(choice="required"), free)   # any parameters
    assert not _accepts(demo_tokenizer, lark(choice="named", name="weather"), free)
    assert not _accepts(demo_tokenizer, lark(choice="required"), "Sure. " + one)
    assert not _accepts(demo_tokenizer, lark(choice="required"), one + "\n" + one)
    auto = lark(choice="auto")
    assert _accepts(demo_tokenizer, auto, "plain text")
    assert _accepts(demo_tokenizer, auto, "Sure.\n" + one + "\n" + free)
    assert not _accepts(demo_tokenizer, lark(choice="auto", parallel=False), one + "\n" + one)


def test_qwen3_coder_strict_refuses_what_a_raw_value_cannot_hold() -> None:
    from tokenfactory.text.tool_parsers import tool_call_grammar
    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^a+$"}}}
    with pytest.raises(ValueError, match="pattern cannot be enforced"):
        tool_call_grammar([("f", schema, True)], "qwen3_coder", choice="required")
    assert tool_call_grammar([("f", schema, False)], "qwen3_coder", choice="required")


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(st.text(alphabet='[TOOL_CALS]{}"name:,ARGSID \n1', max_size=60),
                      st.text(alphabet="<tool_cal>/fun=ptr \n1x", max_size=60)),
       cuts=st.lists(st.integers(0, 100), max_size=6))
def test_garbage_never_raises_and_chunking_does_not_matter(text, cuts) -> None:
    for cls in (MistralToolParser, Qwen3CoderToolParser):
        whole = summarize(run(cls(), [text]))
        assert summarize(run(cls(), split(text, cuts))) == whole
        if not whole[1]:  # no calls: the text is preserved exactly
            assert whole[0] == text
