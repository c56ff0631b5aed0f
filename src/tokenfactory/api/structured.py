"""Structured-output requests: the protocols' fields turned into a ``StructuredOutput``.

OpenAI chat completions: ``response_format``
    ``{"type": "text"}`` (or absent): unconstrained;
    ``{"type": "json_object"}``: any JSON object;
    ``{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}``:
    the schema; ``strict`` (OpenAI's default false) refuses schema keywords the grammar engine
    cannot enforce, without it they are ignored.
Anthropic messages: ``output_config: {"format": {"type": "json_schema", "schema": {...}}}``
    (and the earlier beta's top-level ``output_format`` of the same shape); always strict, as
    Anthropic's structured outputs are. Not combinable with a prefilled assistant turn (the
    grammar constrains the reply from its first token).

Both compile the constraint for the serving tokenizer when one is given (a cache hit for the
engine afterwards), so a schema the grammar engine cannot compile is a 400 in the caller's
protocol before anything is queued. A reasoning template's reply keeps its reasoning section
in front of any of these constraints (``with_reasoning``; text/reasoning.py), which is also how a
thinking budget is enforced.
"""
from __future__ import annotations

import json
from typing import Any

from tokenfactory.api.errors import APIError
from tokenfactory.engine.sampling_params import StructuredOutput

__all__ = ["from_openai", "from_anthropic", "compile_or_400", "tool_constraint",
           "with_reasoning"]


def _get(obj: Any, name: str) -> Any:
    """A field of a request body: a pydantic model (known or extra field) or a dict."""
    if isinstance(obj, dict):
        return obj.get(name)
    value = getattr(obj, name, None)
    if value is None:
        extra = getattr(obj, "model_extra", None) or {}
        value = extra.get(name)
    return value


def _plain(value: Any) -> Any:
    """A pydantic model given for a JSON field, as plain data."""
    dump = getattr(value, "model_dump", None)
    return dump(exclude_none=True) if callable(dump) else value


def _spec(param: str, **kwargs) -> StructuredOutput:
    try:
        return StructuredOutput(**kwargs)
    except ValueError as exc:
        raise APIError(400, f"{param}: {exc}", param=param) from None


def compile_or_400(tokenizer: Any, spec: StructuredOutput | None,
                   param: str) -> StructuredOutput | None:
    """Compile ``spec`` for ``tokenizer`` now (cached for the engine), or answer 400."""
    if spec is None or tokenizer is None or getattr(tokenizer, "backend", None) is None:
        return spec
    from tokenfactory.text.grammar import compile_structured_output
    try:
        compile_structured_output(tokenizer, spec)
    except ValueError as exc:
        raise APIError(400, f"{param}: {exc}", param=param) from None
    return spec


def from_openai(body: Any, tokenizer: Any = None) -> StructuredOutput | None:
    """The constraint an OpenAI request's ``response_format`` asks for, or None."""
    rf = _plain(_get(body, "response_format"))
    if rf is None:
        return None
    param = "response_format"
    if not isinstance(rf, dict):
        raise APIError(400, f"{param} must be an object", param=param)
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return compile_or_400(tokenizer, _spec(param, json_object=True), param)
    if kind != "json_schema":
        raise APIError(400, f"{param}.type must be one of 'text', 'json_object', "
                       f"'json_schema', got {str(kind)[:40]!r}", param=f"{param}.type")
    js = rf.get("json_schema")
    if not isinstance(js, dict):
        raise APIError(400, f"{param}.json_schema must be an object with a 'schema'",
                       param=f"{param}.json_schema")
    name = js.get("name")
    if name is not None and not isinstance(name, str):
        raise APIError(400, f"{param}.json_schema.name must be a string",
                       param=f"{param}.json_schema.name")
    strict = js.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise APIError(400, f"{param}.json_schema.strict must be a boolean",
                       param=f"{param}.json_schema.strict")
    schema = js.get("schema")
    if schema is None:
        raise APIError(400, f"{param}.json_schema.schema is required",
                       param=f"{param}.json_schema.schema")
    p = f"{param}.json_schema.schema"
    return compile_or_400(tokenizer, _spec(p, json_schema=schema, strict=bool(strict)), p)


def from_anthropic(body: Any, tokenizer: Any = None) -> StructuredOutput | None:
    """The constraint an Anthropic request's ``output_config.format`` (or the earlier beta's
    ``output_format``) asks for, or None."""
    param, fmt = "output_config.format", None
    config = _plain(_get(body, "output_config"))
    if config is not None:
        if not isinstance(config, dict):
            raise APIError(400, "output_config must be an object", param="output_config")
        fmt = config.get("format")
    if fmt is None:
        fmt = _plain(_get(body, "output_format"))
        param = "output_format"
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise APIError(400, f"{param}.type must be 'json_schema'", param=f"{param}.type")
    if "schema" not in fmt:
        raise APIError(400, f"{param}.schema: Field required", param=f"{param}.schema")
    messages = _get(body, "messages") or []
    if messages and _get(_plain(messages[-1]), "role") == "assistant":
        raise APIError(400, f"{param} cannot be combined with a prefilled assistant message "
                       "(the last message must be a user message)", param=param)
    p = f"{param}.schema"
    return compile_or_400(tokenizer, _spec(p, json_schema=fmt["schema"], strict=True), p)


def tool_constraint(tokenizer: Any, tools: list[tuple[str, dict | None, bool]],
                    parser_name: str, *, choice: str, name: str | None = None,
                    parallel: bool = True, param: str = "tools") -> StructuredOutput | None:
    """The grammar that makes a reply a well-formed call (or calls) of ``tools`` in the model's
    own format (text/tool_parsers.py ``tool_call_grammar``), compiled now, or a 400 naming
    ``param`` when a tool's schema cannot be compiled. None when the format cannot be
    constrained for ``choice`` (the reply is then parsed unconstrained)."""
    from tokenfactory.text.grammar import special_tokens
    from tokenfactory.text.tool_parsers import tool_call_grammar
    specials = special_tokens(tokenizer) if getattr(tokenizer, "backend", None) else None
    try:
        lark = tool_call_grammar(tools, parser_name, choice=choice, name=name,
                                 parallel=parallel, special_tokens=specials)
    except ValueError as exc:   # a schema the format's grammar cannot hold a call to
        raise APIError(400, f"{param}: {exc}", param=param) from None
    if lark is None:
        return None
    return compile_or_400(tokenizer, _spec(param, lark=lark), param)


# JSON inside a Lark grammar laid out as grammar.py lays out a plain schema: compact.
_COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


def _reply_lark(spec: StructuredOutput) -> str:
    """``spec`` as a Lark grammar (its ``start`` rule is the reply)."""
    if spec.lark is not None:
        return spec.lark
    if spec.regex is not None:
        raise ValueError("a regex constraint cannot follow a reasoning section")
    schema = spec.json_schema if spec.json_schema is not None else {"type": "object"}
    schema = dict(schema, **{"x-guidance": dict(_COMPACT_JSON, lenient=not spec.strict)})
    return "start: %json " + json.dumps(schema, ensure_ascii=False, separators=(",", ":")) + "\n"


def with_reasoning(tokenizer: Any, spec: StructuredOutput | None, budget: int | None, *,
                   inside: bool, param: str = "thinking") -> StructuredOutput:
    """The constraint for a reply that opens with a reasoning section of at most ``budget``
    tokens (None: unbounded) and then satisfies ``spec`` (None: free text), compiled now
    (text/reasoning.py ``reasoning_grammar``)."""
    from tokenfactory.text.grammar import special_tokens
    from tokenfactory.text.reasoning import reasoning_grammar
    specials = special_tokens(tokenizer) if getattr(tokenizer, "backend", None) else None
    lark = reasoning_grammar(budget, inside=inside,
                             reply_lark=None if spec is None else _reply_lark(spec),
                             special_tokens=specials,
                             end_token_ids=sorted(getattr(tokenizer, "eos_token_ids", ()) or ()))
    return compile_or_400(tokenizer, _spec(param, lark=lark), param)
