"""Streaming tool-call extraction from model text (station 11: text back into tool calls): the
registry of formats, which one a chat template teaches, the exact text of a call in each, and
the grammar that constrains a reply's calls.

A parser is fed the detokenizer's text deltas and turns them into events: plain text, and for
each tool call a start (name known), the arguments as JSON fragments, and an end (arguments
parsed). Text streams out immediately except what could still turn out to be part of a call
marker, and trailing whitespace (whitespace right before a call belongs to the call's rendering
in the chat template, so it is dropped; at the end of a message without calls it is emitted).

A malformed call (JSON that does not parse, no name, arguments not an object) is returned as
text, byte for byte; a parser never raises on model output.

The formats, one module each under text/tool_formats/: hermes, llama3_json, mistral (and
mistral_args), qwen3_coder. A leading ``<think>`` section is split off by
text/reasoning_parser.py. The names those modules define are importable from here too.
"""

from __future__ import annotations

import json
import re

__all__ = [
    "TextDelta",
    "ToolCallStart",
    "ToolCallArgsDelta",
    "ToolCallEnd",
    "ParserEvent",
    "ToolCallParser",
    "HermesToolParser",
    "Llama3JsonToolParser",
    "get_tool_parser",
    "detect_tool_parser",
    "render_tool_call_text",
    "tool_call_grammar",
    "ThinkingDelta",
    "ThinkingEnd",
    "ReasoningParser",
    "template_has_reasoning",
    "TOOL_PARSERS",
    "reply_parser",
]


from tokenfactory.text.reasoning_parser import (THINK_END, THINK_START,  # noqa: F401
                                                ReasoningParser, ThinkingDelta, ThinkingEnd,
                                                template_has_reasoning)
from tokenfactory.text.tool_formats import (HermesToolParser, Llama3JsonToolParser,
                                            MistralArgsToolParser, MistralToolParser,
                                            Qwen3CoderToolParser, qwen3_coder_call_grammar,
                                            render_qwen3_coder_call)
from tokenfactory.text.tool_parser_base import (_JSON_LAYOUT, FirstCallOnly,  # noqa: F401
                                               ParserEvent, TextDelta, ToolCallArgsDelta,
                                               ToolCallEnd, ToolCallParser, ToolCallStart, _lit)


TOOL_PARSERS: dict[str, type[ToolCallParser]] = {
    HermesToolParser.name: HermesToolParser,
    Llama3JsonToolParser.name: Llama3JsonToolParser,
    MistralToolParser.name: MistralToolParser,
    MistralArgsToolParser.name: MistralArgsToolParser,
    Qwen3CoderToolParser.name: Qwen3CoderToolParser,
}


def get_tool_parser(name: str) -> type[ToolCallParser]:
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool parser {name!r}; available: {sorted(TOOL_PARSERS)}") from None


def reply_parser(parser_name: str | None, *, stream_arguments: bool = False,
                 tools: dict | None = None, one_call: bool = False, reasoning: bool = False,
                 inside: bool = False):
    """The parser one reply's text goes through, or None when it needs none: the format's
    tool-call parser (``parser_name``; None when calls are not parsed), held to its first
    call when ``one_call`` (no grammar enforces that), behind a splitter of a leading
    ``<think>`` section when ``reasoning`` (``inside``: the prompt already opened it)."""
    parser = (get_tool_parser(parser_name)(stream_arguments=stream_arguments, tools=tools)
              if parser_name is not None else None)
    if parser is not None and one_call:
        parser = FirstCallOnly(parser)
    if reasoning:
        parser = ReasoningParser(parser, inside=inside)
    return parser


def detect_tool_parser(chat_template: str | None) -> str | None:
    """The tool-call format a chat template teaches its model, judged by what the template renders."""
    if not chat_template:
        return None
    if "<function=" in chat_template and "<parameter=" in chat_template:
        return "qwen3_coder"   # (its template also has <tool_call>: checked first)
    if "[TOOL_CALLS]" in chat_template:
        return "mistral_args" if "[ARGS]" in chat_template else "mistral"
    if "<tool_call>" in chat_template:
        return "hermes"
    if "<|python_tag|>" in chat_template or ('"parameters"' in chat_template and "tool_calls" in chat_template):
        return "llama3_json"
    return None


def render_tool_call_text(name: str, arguments: dict, parser_name: str) -> str:
    """The exact text a model emits for one call in `parser_name`'s format (as the templates render it)."""
    if parser_name == "hermes":
        return (
            '<tool_call>\n{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '
            + json.dumps(arguments, ensure_ascii=False) + "}\n</tool_call>"
        )
    if parser_name == "llama3_json":
        return json.dumps({"name": name, "parameters": arguments}, ensure_ascii=False)
    if parser_name == "mistral":
        return "[TOOL_CALLS]" + json.dumps([{"name": name, "arguments": arguments}],
                                           ensure_ascii=False)
    if parser_name == "mistral_args":
        return "[TOOL_CALLS]" + name + "[ARGS]" + json.dumps(arguments, ensure_ascii=False)
    if parser_name == "qwen3_coder":
        return render_qwen3_coder_call(name, arguments)
    raise ValueError(f"unknown tool parser {parser_name!r}; available: {sorted(TOOL_PARSERS)}")


# ------------------------------------------------------------------------ grammars
_PLACEHOLDER = {"__tf_args__": 0}
_ANY_OBJECT = {"type": "object"}


def tool_call_grammar(tools: list[tuple[str, dict | None, bool]], parser_name: str, *,
                      choice: str = "auto", name: str | None = None,
                      parallel: bool = True,
                      special_tokens: dict[str, int] | None = None) -> str | None:
    """A Lark grammar (llguidance syntax) for a reply that calls ``tools`` (name, JSON schema
    or None for any object, strict) in ``parser_name``'s own format, each call's arguments
    valid against that tool's schema: exactly when strict, else as far as the grammar engine
    can enforce the schema's keywords (llguidance's lenient mode ignores the others).
    ``choice``: "auto" (text, or text then calls), "required" (one call, the model picks the
    tool), "named" (one call of tool ``name``). ``parallel``: several calls allowed (auto
    only). None when the format cannot be constrained this way (text then a call needs a marker that
    starts every call, which llama3_json does not have). ``special_tokens``: {text: id} of the
    tokenizer's special tokens, referenced by id where the call text contains them.

    The call text is what ``render_tool_call_text`` renders, so a constrained call parses with
    the same parser as a free one.
    """
    parser_cls = TOOL_PARSERS[parser_name]
    marker = getattr(parser_cls, "START", None)
    if choice == "auto" and marker is None:
        return None
    rules, alts = [], []
    for i, (tool_name, schema, strict) in enumerate(tools):
        if choice == "named" and tool_name != name:
            continue
        if parser_name == "qwen3_coder":   # raw-text values (tool_formats/qwen3_coder.py)
            call, call_rules = qwen3_coder_call_grammar(i, tool_name, schema, strict,
                                                        special_tokens)
            rules += call_rules
            alts.append(call if choice == "auto"
                        else f"{_lit(marker, special_tokens)} {call}")
            continue
        text = render_tool_call_text(tool_name, _PLACEHOLDER, parser_name)
        cut = text.index(json.dumps(_PLACEHOLDER))
        before, after = text[:cut], text[cut + len(json.dumps(_PLACEHOLDER)):]
        if choice == "auto":
            before = before[len(marker):]   # the marker ends the text before the first call
        # JSON laid out as json.dumps does (the templates render earlier calls that way, so a
        # generated call is byte-identical to its rendering in the next turn's prompt), with no
        # free whitespace (small models otherwise emit newlines without end)
        schema = dict(schema if schema else _ANY_OBJECT,
                      **{"x-guidance": dict(_JSON_LAYOUT, lenient=not strict)})
        schema_text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
        rules.append(f"args{i}: %json {schema_text}")
        alts.append(f"{_lit(before, special_tokens)} args{i} {_lit(after, special_tokens)}")
    if not alts:
        raise ValueError(f"no tool named {name!r}")
    lines = ["call: " + " | ".join(alts)]
    more = ""
    if choice == "auto":
        if marker in (special_tokens or {}):   # the marker is one token: text ends before it
            lines.append(f"lead: /(.|\\n)*/ <[{special_tokens[marker]}]>")
            lines.append("TEXT: /(.|\\n)*/")
        else:   # text up to the first marker, which the lead consumes
            lines.append(f"lead[suffix={_lit(marker)}]: /(.|\\n)*/")
            lines.append(f"TEXT: /(.|\\n)*/ & ~/(.|\\n)*{re.escape(marker)}(.|\\n)*/")
        if parallel:
            sep = json.dumps(parser_cls.SEPARATOR) + " " if parser_cls.SEPARATOR else ""
            lines.append(f"more: {sep}{_lit(marker, special_tokens)} call")
            more = " more*"
        start = f"start: TEXT | lead call{more}"
    else:   # a forced choice is one call (small models, allowed more, never stop calling)
        start = "start: call"
    return "\n".join([start, *lines, *rules]) + "\n"
