"""Streaming tool-call extraction from model text (station 11: text back into tool calls).

A parser is fed the detokenizer's text deltas and turns them into events: plain text, and for
each tool call a start (name known), the arguments as JSON fragments, and an end (arguments
parsed). Text streams out immediately except what could still turn out to be part of a call
marker, and trailing whitespace (whitespace right before a call belongs to the call's rendering
in the chat template, so it is dropped; at the end of a message without calls it is emitted).

A malformed call (JSON that does not parse, no name, arguments not an object) is returned as
text, byte for byte; a parser never raises on model output.

Formats:
- hermes: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, repeated for
  several calls (Hermes, Qwen2.5, the demo model).
- llama3_json: Llama 3.1/3.2/3.3 custom tools: the whole message is `{"name": ..., "parameters":
  {...}}` (or "arguments"), optionally after `<|python_tag|>`, several separated by `;`.

Arguments stream as they are generated (``stream_arguments=True``, Hermes format) when a grammar
guarantees the call is well formed (``tool_call_grammar``): the call starts once its name is
complete and every argument byte is passed on as a fragment as soon as it arrives. Without a
grammar a call is held until it is complete, because a malformed one must come back as text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

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
]


from tokenfactory.text.tool_parser_base import (_HERMES_HEAD, ParserEvent,  # noqa: F401
                                               TextDelta, ToolCallArgsDelta, ToolCallEnd,
                                               StepParser, ToolCallParser, ToolCallStart, _ObjectScanner,
                                               _JSON_LAYOUT, _lit, _partial_marker_len,
                                               _validate_call)
from tokenfactory.text.tool_formats import (MistralArgsToolParser, MistralToolParser,
                                            Qwen3CoderToolParser, qwen3_coder_call_grammar,
                                            render_qwen3_coder_call)


class HermesToolParser(ToolCallParser):
    """`<tool_call>{json}</tool_call>` blocks, anywhere in the message."""

    name = "hermes"
    START = "<tool_call>"
    END = "</tool_call>"

    def __init__(self, stream_arguments: bool = False, tools: dict | None = None) -> None:
        super().__init__(stream_arguments)
        self._buf = ""
        self._in_call = False
        # streaming the current call's arguments: the text passed on so far, the scanner
        self._args: str | None = None
        self._args_done = False
        self._scanner: _ObjectScanner | None = None

    def feed(self, text_delta: str) -> list[ParserEvent]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        out: list[ParserEvent] = []
        self._buf += text_delta
        while True:
            if not self._in_call:
                pos = self._buf.find(self.START)
                if pos == -1:
                    keep = _partial_marker_len(self._buf, self.START)
                    self._text(self._buf[: len(self._buf) - keep], out)
                    self._buf = self._buf[len(self._buf) - keep :]
                    return out
                self._text(self._buf[:pos], out)
                self._buf = self._buf[pos + len(self.START) :]
                self._in_call = True
            elif self.stream_arguments and self._stream_call(out):
                continue
            elif self._args is not None:
                return out
            else:
                pos = self._buf.find(self.END)
                if pos == -1:
                    return out
                body = self._buf[:pos]
                self._buf = self._buf[pos + len(self.END) :]
                self._in_call = False
                self._close(body, self.START + body + self.END, out)

    def _stream_call(self, out: list[ParserEvent]) -> bool:
        """Advance a call whose arguments stream; True when the call ended (continue with the
        text after it). Called only while ``_in_call``."""
        if self._args is None:
            m = _HERMES_HEAD.match(self._buf)
            if m is None:
                return False   # the head is still arriving (or malformed: handled at END)
            self._held_ws = ""
            index = self._next_index
            self._next_index += 1
            out.append(ToolCallStart(index, json.loads(m.group(1))))
            self._args, self._args_done, self._scanner = "", False, _ObjectScanner()
            self._buf = self._buf[m.end():]
        if not self._args_done:
            end = self._scanner.feed(self._buf)
            piece = self._buf if end is None else self._buf[:end]
            if piece:
                self._args += piece
                out.append(ToolCallArgsDelta(self._next_index - 1, piece))
            self._buf = "" if end is None else self._buf[end:]
            self._args_done = end is not None
            if not self._args_done:
                return False
        pos = self._buf.find(self.END)
        if pos == -1:
            return False
        self._buf = self._buf[pos + len(self.END):]
        self._end_streamed(out)
        return True

    def _end_streamed(self, out: list[ParserEvent]) -> None:
        try:
            args = json.loads(self._args)
        except (json.JSONDecodeError, RecursionError):
            args = None
        # (under a grammar the arguments always parse; cut short by max_tokens they may not)
        out.append(ToolCallEnd(self._next_index - 1, args if isinstance(args, dict) else {}))
        self._args, self._scanner, self._in_call = None, None, False

    def _close(self, body: str, raw: str, out: list[ParserEvent]) -> None:
        try:
            parsed = _validate_call(json.loads(body), ("arguments", "parameters"))
        except (json.JSONDecodeError, RecursionError):
            parsed = None
        if parsed is None:
            self._text(raw, out)
        else:
            self._call(parsed[0], parsed[1], out)

    def finish(self) -> list[ParserEvent]:
        if self._finished:
            return []
        self._finished = True
        out: list[ParserEvent] = []
        if self._in_call and self._args is not None:   # a streamed call cut short
            if not self._args_done and self._buf:
                self._args += self._buf
                out.append(ToolCallArgsDelta(self._next_index - 1, self._buf))
            self._buf = ""
            self._end_streamed(out)
        elif self._in_call:  # unclosed: accept it if the JSON is complete (the stop came first)
            self._close(self._buf, self.START + self._buf, out)
        else:
            self._text(self._buf, out)
        self._buf = ""
        self._flush_text(out)
        return out


class Llama3JsonToolParser(StepParser):
    """The whole message is one or more JSON calls (`;`-separated), optionally after <|python_tag|>."""

    name = "llama3_json"
    PYTHON_TAG = "<|python_tag|>"

    # states
    _START, _TEXT, _CALL, _BETWEEN = range(4)

    def __init__(self, stream_arguments: bool = False, tools: dict | None = None) -> None:
        super().__init__(stream_arguments)   # (calls are released whole in this format)
        self._state = self._START
        self._buf = ""  # unconsumed text
        self._raw = ""  # text consumed for the current call region, emitted as text if it fails
        # incremental JSON object scanner over self._buf
        self._scan = 0
        self._depth = 0
        self._in_str = False
        self._escape = False

    def _step(self, out: list[ParserEvent]) -> bool:
        """Advance the state machine once; False when more text is needed."""
        buf = self._buf
        if self._state in (self._START, self._BETWEEN):
            stripped = buf.lstrip()
            if not stripped:
                return False
            lead = buf[: len(buf) - len(stripped)]
            if stripped.startswith(self.PYTHON_TAG):
                self._raw += lead + self.PYTHON_TAG
                self._buf = stripped[len(self.PYTHON_TAG) :]
                self._begin_object()
                return True
            if self.PYTHON_TAG.startswith(stripped):
                return False  # maybe the tag, still arriving
            if self._state == self._BETWEEN:
                if stripped.startswith(";"):
                    self._raw += lead + ";"
                    self._buf = stripped[1:]
                    self._begin_object()
                    return True
                # text after the calls: plain text from here on
                self._state = self._TEXT
                return True
            if stripped.startswith("{"):
                self._raw += lead
                self._buf = stripped
                self._begin_object()
                return True
            self._state = self._TEXT
            return True
        if self._state == self._TEXT:
            pos = buf.find(self.PYTHON_TAG)
            if pos == -1:
                keep = _partial_marker_len(buf, self.PYTHON_TAG)
                self._text(buf[: len(buf) - keep], out)
                self._buf = buf[len(buf) - keep :]
                return False
            self._text(buf[:pos], out)
            self._raw = self.PYTHON_TAG
            self._buf = buf[pos + len(self.PYTHON_TAG) :]
            self._begin_object()
            return True
        # _CALL: scan for the end of the JSON object
        end = self._scan_object()
        if end is None:
            return False
        self._close(self._buf[:end], out)
        self._buf = self._buf[end:]
        return True

    def _begin_object(self) -> None:
        self._state = self._CALL
        self._scan = 0
        self._depth = 0
        self._in_str = False
        self._escape = False

    def _scan_object(self) -> int | None:
        """End offset of the first complete top-level JSON value in the buffer, scanning each char once."""
        buf = self._buf
        i = self._scan
        while i < len(buf):
            ch = buf[i]
            i += 1
            if self._in_str:
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif ch == '"':
                    self._in_str = False
            elif ch == '"':
                self._in_str = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth <= 0:
                    self._scan = i
                    return i
            elif self._depth == 0 and not ch.isspace():
                # not an object at all (e.g. "<|python_tag|>print(1)"): fail at once
                self._scan = i
                return i
        self._scan = i
        return None

    def _close(self, obj_text: str, out: list[ParserEvent]) -> None:
        try:
            parsed = _validate_call(json.loads(obj_text), ("parameters", "arguments"))
        except (json.JSONDecodeError, RecursionError):
            parsed = None
        if parsed is None:
            self._text(self._raw + obj_text, out)
            self._raw = ""
            self._state = self._TEXT
            return
        self._raw = ""
        self._call(parsed[0], parsed[1], out)
        self._state = self._BETWEEN

    def finish(self) -> list[ParserEvent]:
        if self._finished:
            return []
        self._finished = True
        out: list[ParserEvent] = []
        if self._state == self._CALL:
            self._close(self._buf, out)  # incomplete JSON: becomes text (unless it parses after all)
        elif self._state == self._BETWEEN and self._buf.strip():
            self._text(self._buf, out)
        elif self._state != self._BETWEEN:
            self._text(self._raw + self._buf, out)
        self._buf = self._raw = ""
        self._flush_text(out)
        return out


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
        if parser_name == "qwen3_coder":   # XML whose values are raw text (tool_formats.py)
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


# ------------------------------------------------------------------------ reasoning
@dataclass
class ThinkingDelta:
    text: str


@dataclass
class ThinkingEnd:
    """The reasoning section closed (its text is everything the ThinkingDeltas carried)."""


THINK_START, THINK_END = "<think>", "</think>"


def template_has_reasoning(chat_template: str | None) -> bool:
    """Whether a chat template knows a ``<think>`` reasoning section (Qwen3, DeepSeek-R1
    distills): then a reply may open with one, returned as thinking, not as text."""
    return bool(chat_template) and THINK_START in chat_template


class ReasoningParser:
    """Splits a leading ``<think>…</think>`` section off a reply: ThinkingDelta events (then
    ThinkingEnd) for it, and the rest to ``inner`` (a tool-call parser) or as TextDelta.
    ``inside``: the prompt already opened the section (templates that end the generation
    prompt with ``<think>``). Anything but whitespace before ``<think>`` means no reasoning.
    """

    def __init__(self, inner: ToolCallParser | None = None, inside: bool = False) -> None:
        self.inner = inner
        self._state = "inside" if inside else "before"
        self._buf = ""
        self._lead = True   # inside: whitespace right after <think> is not shown

    @property
    def num_tool_calls(self) -> int:
        return self.inner.num_tool_calls if self.inner is not None else 0

    def _rest(self, text: str) -> list:
        if not text:
            return []
        return self.inner.feed(text) if self.inner is not None else [TextDelta(text)]

    def feed(self, text_delta: str) -> list:
        out: list = []
        self._buf += text_delta
        if self._state == "before":
            body = self._buf.lstrip()
            if not body or (THINK_START.startswith(body) and body != THINK_START):
                return out   # maybe the marker, still arriving
            if body.startswith(THINK_START):
                self._state, self._buf = "inside", body[len(THINK_START):]
            else:
                self._state = "after"
        if self._state == "inside":
            if self._lead:
                self._buf = self._buf.lstrip()
                self._lead = not self._buf
            pos = self._buf.find(THINK_END)
            if pos == -1:
                # hold back a possible end marker and trailing whitespace (it may end the
                # section: the template's "\n</think>" is not part of the reasoning)
                keep = _partial_marker_len(self._buf, THINK_END)
                head = self._buf[:len(self._buf) - keep]
                text = head.rstrip()
                self._buf = self._buf[len(text):]
                if text:
                    out.append(ThinkingDelta(text))
                return out
            text = self._buf[:pos].rstrip()
            if text:
                out.append(ThinkingDelta(text))
            out.append(ThinkingEnd())
            self._state, self._buf = "after", self._buf[pos + len(THINK_END):]
            self._lead = True
        if self._state == "after":
            if self._lead:   # whitespace between </think> and the answer is the template's
                self._buf = self._buf.lstrip()
                self._lead = not self._buf
            text, self._buf = self._buf, ""
            out += self._rest(text)
        return out

    def finish(self) -> list:
        out: list = []
        if self._state == "inside":   # cut short while reasoning
            if self._buf.strip():
                out.append(ThinkingDelta(self._buf.rstrip()))
            out.append(ThinkingEnd())
        elif self._buf:
            out += self._rest(self._buf)
        self._buf = ""
        if self.inner is not None:
            out += self.inner.finish()
        return out
