"""Anthropic messages -> chat-template messages (OpenAI-style dicts, what HF templates read):
text blocks joined, consecutive same-role turns merged, tool_use blocks as an assistant's
``tool_calls``, tool_result blocks as ``tool`` turns, signed thinking blocks as
``reasoning_content`` for a template that renders reasoning back."""
from __future__ import annotations

from typing import Any

from tokenfactory.api.anthropic_models import (DocumentBlock, ImageBlock, TextBlock,
                                               ThinkingBlock, ToolResultBlock, ToolUseBlock)
from tokenfactory.api.anthropic_thinking import verified_thinking
from tokenfactory.api.errors import APIError

TEXT_JOIN = "\n\n"   # between text blocks of one turn, and between system blocks


def reject_unsupported(block) -> None:
    """400 for a block this model cannot read (images, documents)."""
    if isinstance(block, ImageBlock):
        raise APIError(400, "this model does not accept image input")
    if isinstance(block, DocumentBlock):
        raise APIError(400, "this model does not accept document input")


def _tool_result_text(block: ToolResultBlock) -> str:
    if block.content is None:
        return ""
    if isinstance(block.content, str):
        return block.content
    parts = []
    for b in block.content:
        reject_unsupported(b)
        parts.append(b.text)
    return "\n".join(parts)


def _merge(chat: list[dict], msg: dict) -> None:
    """Append, merging consecutive same-role turns (never tool results)."""
    prev = chat[-1] if chat else None
    if prev is not None and prev["role"] == msg["role"] and msg["role"] != "tool":
        texts = [t for t in (prev.get("content", ""), msg.get("content", "")) if t]
        prev["content"] = TEXT_JOIN.join(texts)
        thoughts = [t for t in (prev.get("reasoning_content"), msg.get("reasoning_content")) if t]
        if thoughts:
            prev["reasoning_content"] = TEXT_JOIN.join(thoughts)
        if msg.get("tool_calls"):
            prev["tool_calls"] = prev.get("tool_calls", []) + msg["tool_calls"]
        return
    chat.append(msg)


def convert_message(msg, content, chat: list[dict], system_role: str,
                    reasoning: bool = False) -> None:
    """Append ``msg`` (its ``content`` cut as the caller wants) to ``chat``. ``reasoning``: the
    template renders reasoning back, so an assistant turn's thinking blocks become its
    ``reasoning_content`` (what Qwen3-style templates read), byte for byte as they were
    returned, which keeps the next turn's prompt a continuation of this one."""
    if isinstance(content, str):
        role = system_role if msg.role == "system" else msg.role
        _merge(chat, {"role": role, "content": content})
        return
    if msg.role == "assistant":
        texts, calls, thoughts = [], [], []
        for b in content:
            reject_unsupported(b)
            if isinstance(b, TextBlock):
                texts.append(b.text)
            elif isinstance(b, ToolUseBlock):
                calls.append({"id": b.id, "type": "function",
                              "function": {"name": b.name, "arguments": b.input}})
            elif isinstance(b, ThinkingBlock) and reasoning:
                thought = verified_thinking(b.thinking, b.signature) or b.thinking
                if thought:
                    thoughts.append(thought)
            # redacted_thinking (and thinking for a model without reasoning): not shown
        out: dict[str, Any] = {"role": "assistant", "content": TEXT_JOIN.join(texts)}
        if thoughts:
            out["reasoning_content"] = TEXT_JOIN.join(thoughts)
        if calls:
            out["tool_calls"] = calls
        _merge(chat, out)
        return
    role = system_role if msg.role == "system" else "user"
    pending: list[str] = []

    def flush():
        if pending:
            _merge(chat, {"role": role, "content": TEXT_JOIN.join(pending)})
            pending.clear()

    for b in content:
        reject_unsupported(b)
        if isinstance(b, TextBlock):
            pending.append(b.text)
        elif isinstance(b, ToolResultBlock):
            flush()
            text = _tool_result_text(b)
            if b.is_error and not text.lower().startswith("error"):
                text = f"Error: {text}"   # templates have no error flag: the text says it
            chat.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": text})
        elif isinstance(b, ToolUseBlock):
            raise APIError(400, f"tool_use blocks may only appear in assistant messages "
                                f"(found one in a {msg.role} message)")
    flush()
