"""Mistral tool calls: ``[TOOL_CALLS]`` followed either by a JSON list of calls (Mistral 7B
v0.3, Mixtral, Nemo: ``[TOOL_CALLS] [{"name": "f", "arguments": {...}}, ...]``) or by the newer
``[TOOL_CALLS]f[ARGS]{...}`` form (Mistral Small 3.x, Magistral, Devstral; an optional
``[CALL_ID]id`` before ``[ARGS]``), one ``[TOOL_CALLS]`` per call. Both forms parse under either
name; ``mistral`` renders (and constrains by grammar) the list form, ``mistral_args`` the newer
one. A malformed call held back comes out as text, byte for byte.
"""
from __future__ import annotations

import json
import re

from tokenfactory.text.tool_parser_base import (_HERMES_HEAD, _MAX_HEAD, ParserEvent,
                                               StepParser, ToolCallArgsDelta, ToolCallEnd,
                                               ToolCallStart, _ObjectScanner, _validate_call)

_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")


class MistralToolParser(StepParser):
    """``[TOOL_CALLS]`` calls, in the JSON-list form or the ``name[ARGS]{...}`` form."""

    name = "mistral"
    START = "[TOOL_CALLS]"
    ARGS = "[ARGS]"
    CALL_ID = "[CALL_ID]"
    SEPARATOR = ""   # between two calls when a grammar writes several

    def __init__(self, stream_arguments: bool = False, tools: dict | None = None) -> None:
        super().__init__(stream_arguments)
        self._buf = ""
        self._state = "text"
        self._raw = ""      # the current call block so far (text again if it is malformed)
        self._scanner: _ObjectScanner | None = None
        self._args = ""
        self._call_name: str | None = None
        self._started = False   # the current call's ToolCallStart went out

    # -- the state machine: each step consumes from _buf; False when more text is needed
    def _step(self, out: list[ParserEvent]) -> bool:
        st, buf = self._state, self._buf
        if st == "text":
            return self._text_until(self.START, "open", out)
        if st == "open":
            body = buf.lstrip()
            if not body:
                return False
            self._take(len(buf) - len(body))
            if body.startswith("["):
                self._take(1)
                self._state = "list"
            else:
                self._state = "name"
            return True
        if st == "name":
            pos = buf.find(self.ARGS)
            if pos == -1:
                if len(buf) > _MAX_HEAD or "\n" in buf:
                    return self._malformed(out)
                return False
            name = buf[:pos].split(self.CALL_ID)[0].strip()
            if not _NAME.fullmatch(name):
                return self._malformed(out)
            self._take(pos + len(self.ARGS))
            self._begin_args(name, out)
            self._state = "args"
            return True
        if st == "list":
            body = buf.lstrip()
            if not body:
                return False
            if body[0] in ",]":
                self._take(len(buf) - len(body) + 1)
                self._state = "list" if body[0] == "," else "text"
                if body[0] == "]":
                    self._raw = ""
                return True
            if body[0] != "{":
                return self._malformed(out)
            if self.stream_arguments:
                m = _HERMES_HEAD.match(body)
                if m is None:
                    return False if len(body) < _MAX_HEAD else self._malformed(out)
                self._take(len(buf) - len(body) + m.end())
                self._begin_args(json.loads(m.group(1)), out)
                self._state = "list_args"
                return True
            self._take(len(buf) - len(body))
            self._scanner, self._args, self._state = _ObjectScanner(), "", "list_obj"
            return True
        if st == "list_obj":   # a whole call object, parsed when complete
            end = self._scanner.feed(buf)
            piece = buf if end is None else buf[:end]
            self._args += piece
            self._take(len(piece))
            if end is None:
                return False
            try:
                parsed = _validate_call(json.loads(self._args), ("arguments", "parameters"))
            except (json.JSONDecodeError, RecursionError):
                parsed = None
            if parsed is None:
                return self._malformed(out)
            self._call(parsed[0], parsed[1], out)
            self._raw, self._state = "", "list"   # (a later malformed item: only it is text)
            return True
        if st in ("args", "list_args"):
            if not self._args.strip() and buf.strip() and not buf.lstrip().startswith("{"):
                return self._malformed(out)
            end = self._scanner.feed(buf)
            piece = buf if end is None else buf[:end]
            self._args += piece
            self._take(len(piece))
            if piece and self._started:
                out.append(ToolCallArgsDelta(self._next_index - 1, piece))
            if end is None:
                return False
            if not self._end_call(out):
                return self._malformed(out)
            self._state = "list_close" if st == "list_args" else "text"
            self._raw = ""
            return True
        # list_close: the rest of a call object whose arguments were streamed, up to its "}"
        pos = buf.find("}")
        if pos == -1:
            return False
        self._take(pos + 1)
        self._raw, self._state = "", "list"
        return True

    def _take(self, n: int) -> None:
        self._raw += self._buf[:n]
        self._buf = self._buf[n:]

    def _begin_args(self, name: str, out: list[ParserEvent]) -> None:
        self._call_name, self._args, self._scanner = name, "", _ObjectScanner()
        self._started = self.stream_arguments
        if self._started:
            self._held_ws = ""
            self._next_index += 1
            out.append(ToolCallStart(self._next_index - 1, name))

    def _end_call(self, out: list[ParserEvent]) -> bool:
        """Close the current call; False if its arguments are malformed (not yet streamed)."""
        try:
            args = json.loads(self._args)
        except (json.JSONDecodeError, RecursionError):
            args = None
        if self._started:   # (under a grammar the arguments always parse)
            out.append(ToolCallEnd(self._next_index - 1, args if isinstance(args, dict) else {}))
            self._started = False
            return True
        if not isinstance(args, dict):
            return False
        self._call(self._call_name, args, out)
        return True

    def _malformed(self, out: list[ParserEvent]) -> bool:
        """Not a call after all: the block so far goes out as text; parsing goes on after it."""
        if self._started:   # already streamed: end it as it is
            out.append(ToolCallEnd(self._next_index - 1, {}))
            self._started = False
        else:
            self._text(self._raw, out)
        self._raw, self._state = "", "text"
        # the text that broke the call is plain text (a later [TOOL_CALLS] may still start one)
        return True

    def finish(self) -> list[ParserEvent]:
        if self._finished:
            return []
        self._finished = True
        out: list[ParserEvent] = []
        st = self._state
        if st in ("args", "list_args") and self._started:   # a streamed call cut short
            if self._buf:
                self._args += self._buf
                out.append(ToolCallArgsDelta(self._next_index - 1, self._buf))
            self._end_call(out)
        elif st == "args" and self._args.strip():
            self._args += self._buf
            self._raw += self._buf
            if not self._end_call(out):
                self._text(self._raw, out)
        elif st in ("list", "list_close") and not self._raw.strip(" \n,"):
            pass   # calls complete, the list just not closed
        elif st != "text" or self._buf:
            self._text(self._raw + self._buf, out)
        self._buf = self._raw = ""
        self._flush_text(out)
        return out


class MistralArgsToolParser(MistralToolParser):
    """The same parser; calls are rendered (and constrained) in the ``name[ARGS]{...}`` form."""

    name = "mistral_args"
