"""A Lark grammar (llguidance) for one Qwen3-Coder XML call, so that a forced call or a strict
tool's call is well formed and its values valid for the tool's schema; used by
``tool_parsers.tool_call_grammar``."""
from __future__ import annotations

import json
import re
from typing import Any

from tokenfactory.text.tool_formats.qwen3_coder import (Qwen3CoderToolParser, _schema_types,
                                                        render_qwen3_coder_call)
from tokenfactory.text.tool_parser_base import _JSON_LAYOUT, _lit

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
