"""Hermes tool calls: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``,
anywhere in the message and repeated for several calls (Hermes, Qwen2.5, the demo model).

Arguments stream as they are generated (``stream_arguments=True``) when a grammar guarantees
the call is well formed (``tool_parsers.tool_call_grammar``): the call starts once its name is
complete and every argument byte is passed on as a fragment as soon as it arrives. Without a
grammar a call is held until it is complete, because a malformed one must come back as text.
"""
from __future__ import annotations

import json

from tokenfactory.text.tool_parser_base import (_HERMES_HEAD, ParserEvent, ToolCallArgsDelta,
                                               ToolCallEnd, ToolCallParser, ToolCallStart,
                                               _ObjectScanner, _partial_marker_len,
                                               _validate_call)


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
