"""Tool-call parsers for Mistral's ``[TOOL_CALLS]`` and Qwen3-Coder's XML function calls.

Same contract as text/tool_parsers.py (events: text, call start, argument fragments, call end;
never raises on model output; a malformed call held back comes out as text, byte for byte):

- mistral: ``[TOOL_CALLS]`` followed either by a JSON list of calls (Mistral 7B v0.3, Mixtral,
  Nemo: ``[TOOL_CALLS] [{"name": "f", "arguments": {...}}, ...]``) or by the newer
  ``[TOOL_CALLS]f[ARGS]{...}`` form (Mistral Small 3.x, Magistral, Devstral; an optional
  ``[CALL_ID]id`` before ``[ARGS]``), one ``[TOOL_CALLS]`` per call. Both forms parse under
  either name; ``mistral`` renders (and constrains by grammar) the list form, ``mistral_args``
  the newer one.
- qwen3_coder: ``<tool_call>\\n<function=f>\\n<parameter=x>\\nvalue\\n</parameter>\\n…
  </function>\\n</tool_call>``. Values are raw text, typed by the tool's JSON schema (an
  integer parameter's ``7`` is 7; a string stays a string; objects and arrays are JSON); the
  arguments go out as the JSON object those values make, laid out as ``json.dumps`` lays it
  out, one fragment per key and value as each is read (string values piece by piece when
  ``stream_arguments``), so the fragments concatenate to exactly ``json.dumps(arguments)``.
  ``qwen3_coder_call_grammar`` constrains such a call (forced calls, strict tools).
"""
from __future__ import annotations

import json
import re
from typing import Any

from tokenfactory.text.tool_parser_base import (_HERMES_HEAD, _JSON_LAYOUT, ParserEvent,
                                               ToolCallArgsDelta, ToolCallEnd, ToolCallParser,
                                               StepParser, ToolCallStart, _lit, _ObjectScanner,
                                               _partial_marker_len, _validate_call)

__all__ = ["MistralToolParser", "MistralArgsToolParser", "Qwen3CoderToolParser",
           "qwen3_coder_call_grammar"]

_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
_MAX_HEAD = 512   # a call head (name, markers) longer than this is not a call


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


# ------------------------------------------------------------------------ Qwen3-Coder XML
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


# ------------------------------------------------------------ Qwen3-Coder XML call grammar
_PARAM_NAME = re.compile(r"[^<>\n]{1,128}")
# A raw value ends at the layout newline before </parameter>; it may not hold the markers the
# parser ends a value at (</parameter>, and <parameter= / </function> while streaming).
_RAW_VALUE = (r'[suffix="\n</parameter>\n"]: /(.|\n)*/ '
              r'& ~/(.|\n)*(<\/parameter>|<parameter=|<\/function>)(.|\n)*/')
_PARAM_TAIL = "\n</parameter>\n"
# string keywords a raw (unquoted) value cannot be held to by the grammar
_RAW_UNENFORCED = ("pattern", "format", "minLength", "maxLength")


def qwen3_coder_call_grammar(i: int, name: str, schema: dict | None, strict: bool,
                             special_tokens: dict[str, int] | None) -> tuple[str, list[str]]:
    """(Lark for one call of tool ``name`` after its ``<tool_call>`` marker, the rules it
    uses; names are suffixed with ``i``), in exactly the layout ``render_tool_call_text``
    gives. Parameters come in the schema's order, required ones always, the others optional;
    a schema without ``properties`` takes any parameters. A value is JSON of its schema
    (``%json``: integers, numbers, booleans, objects, arrays, null), one of a string
    ``enum``/``const``, or raw text for strings. Raw text cannot be held to ``pattern``,
    ``format`` or lengths: a strict tool using them is a ValueError, a lenient one skips them.
    """
    schema = schema if isinstance(schema, dict) else {}
    defs = {k: schema[k] for k in ("$defs", "definitions") if k in schema}
    props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    required = set(schema.get("required") or ())
    raw = f"xraw{i}"
    rules = [raw + _RAW_VALUE]
    parts = []
    for j, (key, sub) in enumerate(props.items()):
        if not _PARAM_NAME.fullmatch(key):
            raise ValueError(f"tool {name!r}: parameter name {key[:40]!r} cannot be written "
                             "as <parameter=NAME>")
        rule = f"xp{i}_{j}"
        head = _lit(f"<parameter={key}>\n")
        rules.append(f"{rule}: {head} {_value(sub, defs, strict, raw, f'{name}.{key}')}")
        parts.append(rule if key in required else f"{rule}?")
    if not props:   # any parameters, any values
        rules.append(f'xany{i}: "<parameter=" /[^<>\\n]{{1,128}}/ ">\\n" {raw}')
        parts.append(f"xany{i}*")
    empty = render_qwen3_coder_call(name, {})
    cut = empty.index("</function>")
    before, after = empty[:cut], empty[cut:]
    before = before[len(Qwen3CoderToolParser.START):]   # the caller writes the marker
    body = " ".join([_lit(before, special_tokens), *parts, _lit(after, special_tokens)])
    return body, rules


def render_qwen3_coder_call(name: str, arguments: dict) -> str:
    """The exact text of one call (strings raw, other values as JSON), as templates render
    it and the grammar above admits it."""
    params = "".join(f"<parameter={k}>\n{v if isinstance(v, str) else json.dumps(v)}"
                     "\n</parameter>\n" for k, v in arguments.items())
    return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"


def _value(sub: Any, defs: dict, strict: bool, raw: str, where: str) -> str:
    """Lark for one parameter's value and the layout after it."""
    sub = sub if isinstance(sub, dict) else {}
    types = _schema_types(sub)
    tail = _lit(_PARAM_TAIL)
    choices = sub.get("enum") if "enum" in sub else [sub["const"]] if "const" in sub else None
    if choices and all(isinstance(c, str) for c in choices) and types <= {"string"}:
        return "(" + " | ".join(_lit(c) for c in choices) + ") " + tail
    if types and "string" not in types or choices and not all(isinstance(c, str)
                                                               for c in choices):
        # JSON, as the parser reads it back (typed_value)
        held = dict(sub, **defs, **{"x-guidance": dict(_JSON_LAYOUT, lenient=not strict)})
        return "%json " + json.dumps(held, ensure_ascii=False, separators=(",", ":")) + " " + tail
    if strict:
        bad = [k for k in _RAW_UNENFORCED if k in sub]
        if bad:
            raise ValueError(f"{where}: {', '.join(bad)} cannot be enforced on a raw "
                             "Qwen3-Coder parameter value; drop strict or the keyword")
    return raw
