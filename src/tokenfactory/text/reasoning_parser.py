"""Reasoning sections out of model text: a reply's leading ``<think>…</think>`` becomes
ThinkingDelta events (then ThinkingEnd), the rest goes on to a tool-call parser or out as text.
The budgets and effort levels that bound such a section are text/reasoning.py."""
from __future__ import annotations

from dataclasses import dataclass

from tokenfactory.text.tool_parser_base import TextDelta, ToolCallParser, _partial_marker_len


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
