"""Qwen3-Coder tool calls: ``<tool_call>\\n<function=f>\\n<parameter=x>\\nvalue\\n</parameter>\\n…
</function>\\n</tool_call>``.

Values are raw text, typed by the tool's JSON schema (an integer parameter's ``7`` is 7; a
string stays a string; objects and arrays are JSON); the arguments go out as the JSON object
those values make, laid out as ``json.dumps`` lays it out, one fragment per key and value as
each is read (string values piece by piece when ``stream_arguments``), so the fragments
concatenate to exactly ``json.dumps(arguments)``. qwen3_coder_grammar.py constrains such a
call (forced calls, strict tools).
"""
from __future__ import annotations

import json
import re
from typing import Any

from tokenfactory.text.tool_parser_base import (_MAX_HEAD, ParserEvent, StepParser,
                                               ToolCallArgsDelta, ToolCallEnd, ToolCallStart,
                                               _partial_marker_len)


def _schema_types(schema: Any) -> set[str]:
    if not isinstance(schema, dict):
        return set()
    t = schema.get("type")
    types = set(t) if isinstance(t, list) else {t} if isinstance(t, str) else set()
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or []:
            types |= _schema_types(sub)
    return types


def typed_value(raw: str, schema: Any) -> Any:
    """A parameter's raw text as its schema's type says (text when it does not convert)."""
    types = _schema_types(schema)
    if not types or "string" in types and len(types) == 1:
        return raw
    text = raw.strip()
    if "null" in types and text.lower() in ("null", "none"):
        return None
    if "boolean" in types and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if types & {"integer", "number", "object", "array"}:
        try:
            value = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            return raw
        ok = ((isinstance(value, int) and not isinstance(value, bool) and types & {"integer",
                                                                                   "number"})
              or (isinstance(value, float) and "number" in types)
              or (isinstance(value, dict) and "object" in types)
              or (isinstance(value, list) and "array" in types))
        return value if ok else raw
    return raw


class Qwen3CoderToolParser(StepParser):
    """``<tool_call><function=f><parameter=x>v</parameter>…</function></tool_call>`` calls."""

    name = "qwen3_coder"
    START = "<tool_call>"
    END = "</tool_call>"
    SEPARATOR = "\n"
    _FUNC = re.compile(r"\s*<function=([^>\n]{1,128})>")
    _PARAM = re.compile(r"\s*<parameter=([^>\n]{1,128})>")
    _PARAM_END = "</parameter>"
    _FUNC_END = "</function>"

    def __init__(self, stream_arguments: bool = False, tools: dict | None = None) -> None:
        super().__init__(stream_arguments)
        self.tools = tools or {}   # name -> parameters schema (types the values)
        self._buf = ""
        self._state = "text"
        self._raw = ""
        self._props: dict = {}
        self._args: dict = {}
        self._key: str | None = None
        self._value = ""
        self._value_started = False
        self._streaming_str = False   # the current value streams as a JSON string

    def _frag(self, text: str, out: list[ParserEvent]) -> None:
        out.append(ToolCallArgsDelta(self._next_index - 1, text))

    def _step(self, out: list[ParserEvent]) -> bool:
        st, buf = self._state, self._buf
        if st == "text":
            return self._text_until(self.START, "func", out)
        if st == "func":
            m = self._FUNC.match(buf)
            if m is None:
                body = buf.lstrip()
                if len(buf) < _MAX_HEAD and ("<function=".startswith(body[:10])
                                             and ">" not in body):
                    return False   # still arriving
                self._text(self._raw, out)   # not a call: the marker was text
                self._raw, self._state = "", "text"
                return True
            name = m.group(1).strip()
            self._raw += buf[:m.end()]
            self._buf = buf[m.end():]
            self._held_ws = ""
            self._next_index += 1
            out.append(ToolCallStart(self._next_index - 1, name))
            schema = self.tools.get(name) or {}
            self._props = schema.get("properties") or {} if isinstance(schema, dict) else {}
            self._args, self._state = {}, "params"
            return True
        if st == "params":
            body = buf.lstrip()
            if body.startswith(self._FUNC_END):
                self._frag("}" if self._args else "{}", out)
                out.append(ToolCallEnd(self._next_index - 1, self._args))
                self._buf = body[len(self._FUNC_END):]
                self._state = "close"
                return True
            m = self._PARAM.match(buf)
            if m is None:
                if (self._FUNC_END.startswith(body) or "<parameter=".startswith(body[:11])
                        and ">" not in body) and len(body) < _MAX_HEAD:
                    return False
                # neither a parameter nor the end: the call ends here as it is
                self._frag("}" if self._args else "{}", out)
                out.append(ToolCallEnd(self._next_index - 1, self._args))
                self._state = "text"
                return True
            self._key = m.group(1).strip()
            self._buf = buf[m.end():]
            sep = ", " if self._args else "{"
            self._frag(sep + json.dumps(self._key, ensure_ascii=False) + ": ", out)
            self._args[self._key] = None
            self._value, self._value_started, self._state = "", False, "value"
            types = _schema_types(self._props.get(self._key))
            self._streaming_str = self.stream_arguments and (not types or types == {"string"})
            if self._streaming_str:
                self._frag('"', out)
            return True
        if st == "value":
            if not self._value_started:   # the newline after <parameter=x> is layout
                if not buf:
                    return False
                if buf.startswith("\n"):
                    buf = self._buf = buf[1:]
                self._value_started = True
            pos = buf.find(self._PARAM_END)
            alt = -1 if pos != -1 else min((p for p in (buf.find("<parameter="),
                                                        buf.find(self._FUNC_END)) if p != -1),
                                           default=-1)   # a missing </parameter>
            end = pos if pos != -1 else alt
            if end == -1:
                keep = max(_partial_marker_len(buf, self._PARAM_END),
                           _partial_marker_len(buf, self._FUNC_END))
                head = buf[:len(buf) - keep]
                if head.endswith("\n"):
                    head = head[:-1]   # maybe the layout newline before </parameter>
                self._add_value(head, out)
                self._buf = buf[len(head):]
                return False
            text = buf[:end]
            if text.endswith("\n"):
                text = text[:-1]
            self._add_value(text, out)
            self._buf = buf[end + len(self._PARAM_END):] if pos != -1 else buf[end:]
            raw = self._value
            value = raw if self._streaming_str else typed_value(raw, self._props.get(self._key))
            self._args[self._key] = value
            self._frag('"' if self._streaming_str else json.dumps(value, ensure_ascii=False),
                       out)
            self._state = "params"
            return True
        # close: whitespace, then </tool_call>
        body = buf.lstrip()
        if not body:
            return False
        if body.startswith(self.END):
            self._buf = body[len(self.END):]
        elif not self.END.startswith(body):
            self._buf = body
        else:
            return False
        self._state, self._raw = "text", ""
        return True

    def _add_value(self, text: str, out: list[ParserEvent]) -> None:
        if not text:
            return
        self._value += text
        if self._streaming_str:
            self._frag(json.dumps(text, ensure_ascii=False)[1:-1], out)

    def finish(self) -> list[ParserEvent]:
        if self._finished:
            return []
        self._finished = True
        out: list[ParserEvent] = []
        if self._state == "value":   # cut short inside a value: keep what arrived
            self._add_value(self._buf, out)
            self._buf = ""
            raw = self._value
            self._args[self._key] = (raw if self._streaming_str
                                     else typed_value(raw, self._props.get(self._key)))
            self._frag('"' if self._streaming_str
                       else json.dumps(self._args[self._key], ensure_ascii=False), out)
            self._state = "params"
        if self._state == "params":
            self._frag("}" if self._args else "{}", out)
            out.append(ToolCallEnd(self._next_index - 1, self._args))
        elif self._state == "func":
            self._text(self._raw + self._buf, out)
        elif self._state == "text":
            self._text(self._buf, out)
        self._buf = self._raw = ""
        self._flush_text(out)
        return out


def render_qwen3_coder_call(name: str, arguments: dict) -> str:
    """The exact text of one call (strings raw, other values as JSON), as templates render
    it and the grammar (qwen3_coder_grammar.py) admits it."""
    params = "".join(f"<parameter={k}>\n{v if isinstance(v, str) else json.dumps(v)}"
                     "\n</parameter>\n" for k, v in arguments.items())
    return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"

