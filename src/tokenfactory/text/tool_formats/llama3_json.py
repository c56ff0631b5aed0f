"""Llama 3.1/3.2/3.3 custom tools: the whole message is ``{"name": ..., "parameters": {...}}``
(or "arguments"), optionally after ``<|python_tag|>``, several separated by ``;``. Calls are
released whole (a malformed one comes back as text, byte for byte)."""
from __future__ import annotations

import json

from tokenfactory.text.tool_parser_base import (ParserEvent, StepParser, _partial_marker_len,
                                               _validate_call)


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
