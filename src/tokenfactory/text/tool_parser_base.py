"""The pieces every tool-call parser shares: the events a parser emits, the parser base class,
and small scanners (a call marker arriving in pieces, the end of a JSON object, the head of a
``{"name": ..., "arguments": ...}`` call). The formats in tool_formats/ build on them;
tool_parsers.py is their registry."""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Union

@dataclass
class TextDelta:
    text: str


@dataclass
class ToolCallStart:
    index: int
    name: str


@dataclass
class ToolCallArgsDelta:
    index: int
    json_fragment: str


@dataclass
class ToolCallEnd:
    index: int
    arguments: dict


ParserEvent = Union[TextDelta, ToolCallStart, ToolCallArgsDelta, ToolCallEnd]

# JSON in a call grammar laid out as json.dumps lays it out (the templates render earlier calls
# that way), with no free whitespace
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# a call head (name, markers) longer than this is not a call (Mistral, Qwen3-Coder)
_MAX_HEAD = 512


def _lit(text: str, specials: dict[str, int] | None = None) -> str:
    """Lark for the literal ``text``: string literals, with each special token of the
    tokenizer in it (``<tool_call>`` is one in some vocabularies) as a token reference
    ``<[id]>`` (a special token never matches its text byte by byte)."""
    found = [t for t in specials or {} if t and t in text]
    if not found:
        return json.dumps(text, ensure_ascii=False)
    pattern = re.compile("|".join(re.escape(t) for t in sorted(found, key=len, reverse=True)))
    parts, pos = [], 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            parts.append(json.dumps(text[pos:m.start()], ensure_ascii=False))
        parts.append(f"<[{specials[m.group(0)]}]>")
        pos = m.end()
    if pos < len(text):
        parts.append(json.dumps(text[pos:], ensure_ascii=False))
    return " ".join(parts)


def _partial_marker_len(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def _validate_call(obj: Any, arg_keys: tuple[str, ...]) -> tuple[str, dict] | None:
    """(name, arguments) if `obj` is a well-formed call, else None."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    present = [k for k in arg_keys if k in obj]
    if not present:
        return name, {}
    args = obj[present[0]]
    if isinstance(args, str):  # some models double-encode the arguments
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return name, args


class ToolCallParser(ABC):
    """Feed text deltas, get events; call finish() once at the end of the message."""

    name: str = ""

    # between two calls of one reply, as a grammar writes them (tool_call_grammar)
    SEPARATOR = "\n"

    def __init__(self, stream_arguments: bool = False) -> None:
        self.stream_arguments = stream_arguments
        self._next_index = 0
        self._held_ws = ""  # trailing whitespace not yet emitted
        self._finished = False

    @property
    def num_tool_calls(self) -> int:
        return self._next_index

    @abstractmethod
    def feed(self, text_delta: str) -> list[ParserEvent]:
        """Consume more model text; return the events it completes."""

    @abstractmethod
    def finish(self) -> list[ParserEvent]:
        """End of the message: return everything still held back."""

    # -- helpers shared by the formats

    def _text(self, text: str, out: list[ParserEvent]) -> None:
        """Emit text, holding back trailing whitespace until something non-blank follows."""
        if not text:
            return
        text = self._held_ws + text
        body = text.rstrip()
        self._held_ws = text[len(body) :]
        if body:
            out.append(TextDelta(body))

    def _flush_text(self, out: list[ParserEvent]) -> None:
        """At the end: trailing whitespace is kept only for a message without tool calls."""
        if self._held_ws and self._next_index == 0:
            out.append(TextDelta(self._held_ws))
        self._held_ws = ""

    def _call(self, name: str, arguments: dict, out: list[ParserEvent]) -> None:
        self._held_ws = ""  # whitespace between text and a call is part of the call's rendering
        index = self._next_index
        self._next_index += 1
        out.append(ToolCallStart(index, name))
        out.append(ToolCallArgsDelta(index, json.dumps(arguments, ensure_ascii=False)))
        out.append(ToolCallEnd(index, arguments))


# The head of a Hermes call up to its arguments: `{"name": "NAME", "arguments": `.
_HERMES_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*'
                          r'"(?:arguments|parameters)"\s*:\s*(?=\{)')


class StepParser(ToolCallParser):
    """A format parsed by a state machine over a text buffer: ``feed`` appends to ``_buf``
    and runs ``_step`` until it needs more text. Subclasses set ``_buf``, ``_state`` and
    implement ``_step(out) -> bool`` (False: wait for more text)."""

    _buf: str
    _state: str

    def feed(self, text_delta: str) -> list[ParserEvent]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        out: list[ParserEvent] = []
        self._buf += text_delta
        while self._step(out):
            pass
        return out

    @abstractmethod
    def _step(self, out: list[ParserEvent]) -> bool:
        """Advance the state machine once; False when more text is needed."""

    def _text_until(self, marker: str, next_state: str, out: list[ParserEvent]) -> bool:
        """The text state: emit text up to ``marker`` (holding back a partial marker at the
        end of the buffer), then consume the marker into ``_raw`` and go to ``next_state``."""
        buf = self._buf
        pos = buf.find(marker)
        if pos == -1:
            keep = _partial_marker_len(buf, marker)
            self._text(buf[:len(buf) - keep], out)
            self._buf = buf[len(buf) - keep:]
            return False
        self._text(buf[:pos], out)
        self._raw, self._buf, self._state = marker, buf[pos + len(marker):], next_state
        return True


class _ObjectScanner:
    """Finds where a JSON object ends, one character at a time (strings and escapes aware)."""

    def __init__(self) -> None:
        self.depth, self.in_str, self.escape = 0, False, False

    def feed(self, text: str) -> int | None:
        """Offset just past the object's closing brace in ``text``, or None (not yet)."""
        for i, ch in enumerate(text):
            if self.in_str:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_str = False
            elif ch == '"':
                self.in_str = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return None


class FirstCallOnly:
    """At most one tool call: ``inner``'s events up to the end of its first call, nothing
    after it. Enforces "no parallel calls" (and a forced single call) for formats no grammar
    constrains (Qwen3-Coder's XML, Llama 3 JSON in auto mode); with a grammar the reply itself
    ends after the first call."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self._done = False

    @property
    def num_tool_calls(self) -> int:
        return min(self.inner.num_tool_calls, 1)

    def _pass(self, events: list) -> list:
        if self._done:
            return []
        for i, ev in enumerate(events):
            if isinstance(ev, ToolCallEnd):
                self._done = True
                return events[:i + 1]
        return events

    def feed(self, text_delta: str) -> list:
        return self._pass(self.inner.feed(text_delta))

    def finish(self) -> list:
        return self._pass(self.inner.finish())
