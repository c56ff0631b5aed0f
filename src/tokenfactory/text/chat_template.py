"""Chat template rendering, compatible with `transformers`' apply_chat_template(tokenize=False).

Templates come from model repositories, i.e. they are untrusted code: they run in jinja2's
ImmutableSandboxedEnvironment, and everything they see is rebuilt from plain JSON-like values.
The environment mirrors the one HF gives templates (trim_blocks, lstrip_blocks, loop controls,
`raise_exception`, `strftime_now`, a non-HTML-escaping `tojson` with indent support, `dict`,
`namespace`), so a template renders to the same bytes here and there.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenfactory.text.tool_parsers import render_tool_call_text

__all__ = ["ChatTemplateError", "render_chat_template", "compile_chat_template",
           "generic_tools_text", "with_generic_tools"]

# Appended to the final message for continue_final_message, then cut away with everything after it.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# Older names for a message's reasoning; templates read `reasoning_content` (and gpt-oss `thinking`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """The chat template is missing, invalid, or refused the conversation."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson HTML-escapes '<', '>', '&' and "'"; chat templates need the plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _DictFactory:
    """`dict(...)` inside templates, without exposing the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """jinja2's namespace(), refusing underscore-prefixed attributes (no reaching into internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same trick as jinja2.utils.Namespace
        self, args = args[0], args[1:]
        for name in dict(*args, **kwargs):
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, *args, **kwargs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore-prefixed attributes ({name!r})")


class _GenerationTag(jinja2.ext.Extension):
    """Accept HF's `{% generation %}...{% endgeneration %}` blocks (used for assistant masks): a no-op here."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


@lru_cache(maxsize=32)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile once per distinct template text."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _DictFactory()
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template syntax error at line {exc.lineno}: {exc.message}") from None


def _plain(value: Any) -> Any:
    """A deep copy made of plain JSON-like types (templates only ever see these)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return _plain(value.item())
        except Exception:  # noqa: BLE001 - not a scalar after all
            pass
    return f"<{type(value).__name__}>"


def _prepare_messages(messages: list[dict]) -> list[dict]:
    out = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"chat messages must be dicts, got {type(message).__name__}")
        # Keys set to None are dropped: OpenAI-style `content: null` / `tool_calls: null` would
        # otherwise render as "None" in many templates (HF does the same).
        message = {k: _plain(v) for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render_chat_template(
    template: str,
    messages: list[dict],
    *,
    tools: list[dict] | None = None,
    add_generation_prompt: bool = False,
    continue_final_message: bool | str = False,
    **variables: Any,
) -> str:
    """Render one conversation. `variables` (bos_token, documents, ...) are visible to the template."""
    if not messages:
        raise ChatTemplateError("cannot apply a chat template to an empty conversation")
    compiled = compile_chat_template(template)
    chat = _prepare_messages(messages)
    documents = _plain(variables.pop("documents", None))
    tools = _plain(list(tools)) if tools is not None else None
    variables = {k: _plain(v) for k, v in variables.items()}

    final_text: str | None = None
    if continue_final_message:
        if add_generation_prompt:
            raise ChatTemplateError("continue_final_message and add_generation_prompt cannot both be set")
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        final_text = chat[-1].get(field)
        if final_text is None:
            raise ChatTemplateError(f'continue_final_message is set but the final message has no "{field}"')
        fields = [field]
        if field in _REASONING_FIELDS:
            fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final_text]
        if not any(f in template for f in fields):
            raise ChatTemplateError(f'continue_final_message: the chat template never reads "{field}"')
        if isinstance(final_text, (list, tuple)):
            for block in reversed(final_text):
                if isinstance(block, dict) and "text" in block:
                    final_text = block["text"]
                    block["text"] = block["text"] + _CONTINUE_TAG
                    break
            else:
                raise ChatTemplateError("continue_final_message: the final message has no text block to continue")
        else:
            for f in fields:
                chat[-1][f] = chat[-1][f] + _CONTINUE_TAG

    try:
        rendered = compiled.render(
            messages=chat,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"chat template error: {exc}") from None

    if continue_final_message:
        tag = _CONTINUE_TAG.strip()
        if str(final_text).strip() not in rendered or tag not in rendered:
            raise ChatTemplateError(
                "continue_final_message: the final message does not appear in the rendered chat "
                "(the template rewrites it)"
            )
        loc = rendered.rindex(tag)
        if rendered[loc : loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            rendered = rendered[:loc]
        else:  # the template trimmed trailing whitespace after the message
            rendered = rendered[:loc].rstrip()
    return rendered


# ------------------------------------------------------------ tools for templates without any
GENERIC_TOOLS_INTRO = (
    "You can call the tools below. Each line describes one tool as JSON: its name, what it "
    "does, and the JSON schema its arguments must satisfy.")
GENERIC_TOOLS_HOWTO = (
    "To call a tool, write exactly this, one block per call, with the arguments as a JSON "
    "object:\n<tool_call>\n{\"name\": \"TOOL_NAME\", \"arguments\": {...}}\n</tool_call>\n"
    "Write nothing after the last block: the results come back in the next message. If no "
    "tool is needed, answer in plain text.")


def generic_tools_text(tools: list[dict]) -> str:
    """The system-prompt section describing ``tools`` (OpenAI-style function dicts) for a chat
    template that has no tool section of its own; calls come back in the Hermes format
    (``<tool_call>`` JSON), which text/tool_parsers.py parses and a grammar can enforce."""
    lines = [GENERIC_TOOLS_INTRO]
    for t in tools:
        f = t.get("function", t)
        lines.append(json.dumps({"name": f["name"], "description": f.get("description") or "",
                                 "parameters": f.get("parameters") or {"type": "object"}},
                                ensure_ascii=False))
    lines.append(GENERIC_TOOLS_HOWTO)
    return "\n".join(lines)


def with_generic_tools(messages: list[dict], tools: list[dict]) -> list[dict]:
    """``messages`` rewritten for a template that cannot show tools: the tool descriptions
    join the system turn (one is added at the front if there is none), earlier calls become
    their ``<tool_call>`` text in the assistant turn, and tool results become user turns
    wrapped in ``<tool_result>`` tags (templates without tools often refuse a "tool" role)."""
    out: list[dict] = []
    text = generic_tools_text(tools)
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        first["content"] = f"{first.get('content') or ''}\n\n{text}".lstrip("\n")
        out.append(first)
        rest = messages[1:]
    else:
        out.append({"role": "system", "content": text})
        rest = messages
    for m in rest:
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for c in m.pop("tool_calls"):
                f = c.get("function", c)
                args = f.get("arguments") or {}
                if isinstance(args, str):
                    args = json.loads(args) if args.strip() else {}
                calls.append(render_tool_call_text(f["name"], args, "hermes"))
            m["content"] = "\n".join(filter(None, [m.get("content") or "", *calls]))
        if m.get("role") == "tool":
            m = {"role": "user",
                 "content": f"<tool_result>\n{m.get('content') or ''}\n</tool_result>"}
        out.append(m)
    return out
