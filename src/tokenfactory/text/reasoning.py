"""Reasoning control: how long a reply may think, as a grammar the sampler enforces.

Templates with a reasoning section (``<think>…</think>``: Qwen3, DeepSeek-R1 distills) let a
client bound the thinking: Anthropic's ``thinking.budget_tokens`` and ``output_config.effort``,
OpenAI's ``reasoning_effort``. A bound becomes a Lark grammar (llguidance) for the whole reply:

    "<think>\\n"  THINKING (at most ``budget`` tokens, never containing "</think>")
    "\\n</think>\\n\\n"  REPLY

llguidance counts the tokens of the bounded rule and, when they are spent, allows only what
may follow it: the closing ``</think>`` is then forced token by token (the grammar path every
constrained request already takes), and the answer continues after it. A model that closes
the section earlier on its own is free to (its closing tags count against the budget: a close
begun in the budget's last few tokens is cut, and the forced one follows it). The section is laid
out exactly as Qwen3-style templates render it back (``<think>\\n{reasoning}\\n</think>\\n\\n``),
so the next turn's prompt repeats the reply byte for byte and its KV pages are cache hits.

``REPLY`` is free text, or another grammar's start rule (a forced / strict tool call), so a
constrained reply still reasons first. Without a bound no grammar is needed: the reply opens
its section on its own and ``ReasoningParser`` splits it off.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from tokenfactory.text.tool_parsers import THINK_END, THINK_START, _lit

__all__ = ["EFFORTS", "ReasoningPlan", "effort_budget", "reasoning_grammar", "plan_reasoning"]

# Anthropic's output_config.effort levels, in ascending order; OpenAI's reasoning_effort adds
# "minimal" (and "none", meaning no reasoning). The share of max_tokens a level may spend on
# thinking: None is unbounded (the model's own judgement, up to max_tokens).
EFFORTS: dict[str, float | None] = {"none": 0.0, "minimal": 0.125, "low": 0.25,
                                    "medium": 0.5, "high": None, "xhigh": None, "max": None}

OPEN = THINK_START + "\n"
CLOSE = "\n" + THINK_END + "\n\n"


def effort_budget(effort: str | None, max_tokens: int) -> int | None:
    """Thinking tokens an effort level allows within ``max_tokens`` (None: unbounded)."""
    if effort is None:
        return None
    share = EFFORTS[effort]
    return None if share is None else int(max_tokens * share)


@dataclass
class ReasoningPlan:
    """What one request's reply does with its reasoning section.

    ``switch``: the template's reasoning switch to render with (Qwen3's ``enable_thinking``),
    None when the template has none or the request did not say. ``budget``: the most tokens
    the section may take (0: closed at once), None when unbounded."""
    switch: bool | None = None
    budget: int | None = None


def plan_reasoning(*, template: str, thinking_type: str | None, budget_tokens: int | None,
                   effort: str | None, max_tokens: int) -> ReasoningPlan:
    """The plan for a request on a template with a reasoning section.

    ``thinking_type``: "enabled" / "adaptive" / "disabled" (None: the template's default).
    Disabled uses the template's switch when it has one, else a zero budget (the section is
    opened and closed at once, as the switch itself does). Enabled with ``budget_tokens`` and
    an effort level both bound the section: the smaller bound wins."""
    has_switch = "enable_thinking" in template
    if thinking_type == "disabled" or effort == "none":
        return ReasoningPlan(False, None) if has_switch else ReasoningPlan(None, 0)
    switch = True if (has_switch and thinking_type is not None) else None
    bounds = [b for b in (budget_tokens if thinking_type == "enabled" else None,
                          effort_budget(effort, max_tokens)) if b is not None]
    return ReasoningPlan(switch, min(bounds) if bounds else None)


def _rename_start(lark: str, name: str) -> str:
    """``lark`` with its ``start`` rule renamed (its other rules must not clash with ours)."""
    return re.sub(r"^start(\s*:)", name + r"\1", lark, count=1, flags=re.MULTILINE)


def reasoning_grammar(budget: int | None, *, inside: bool = False, reply_lark: str | None = None,
                      special_tokens: dict[str, int] | None = None,
                      end_token_ids: tuple[int, ...] | list[int] = ()) -> str:
    """A Lark grammar (llguidance syntax) for a reply whose reasoning section takes at most
    ``budget`` tokens (None: unbounded, for a constrained reply that still reasons first).
    ``inside``: the prompt already opened the section (its generation
    prompt ends with ``<think>``). ``reply_lark``: a grammar for what follows the section
    (its ``start`` rule is renamed), else free text. ``special_tokens``: {text: id} of the
    tokenizer's special tokens, named by id where the markers are special tokens; free text
    may contain any of them but ``end_token_ids`` (EOS ends the reply as it always does)."""
    if budget is not None and budget < 0:
        raise ValueError(f"a thinking budget must be >= 0, got {budget}")
    head = "" if inside else _lit(OPEN, special_tokens) + " "
    close = _lit(CLOSE, special_tokens)
    lines = []
    if budget == 0:
        lines.append(f"start: {head}{close} reply")
    else:
        # Two ways out of the section. The model closes it itself (CLOSED: the text and its
        # closing tags as one terminal), or the budget runs out inside the open text (a
        # greedy terminal that can end anywhere) and the closing tags are forced after it.
        # Both are tried in parallel; a single terminal cannot do both, because llguidance's
        # lexer ends a terminal only where the next byte cannot extend it.
        bound = "" if budget is None else f"[max_tokens={budget}]"
        lines.append(f"start: {head}think reply")
        lines.append(f"think_open{bound}: THINK_TEXT")
        if THINK_END in (special_tokens or {}):
            # a special token ends the text terminal by itself (no text matches it)
            end = _lit(CLOSE.lstrip("\n"), special_tokens)
            lines.append(f'think: think_open "\\n"? {end}')
        else:
            lines.append("think: think_closed" if budget is None
                         else f"think: think_open {close} | think_closed")
            lines.append(f"think_closed{bound}: THINK_CLOSED")
            lines.append(f"THINK_CLOSED: THINK_TEXT {close}")
        lines.append("THINK_TEXT: /(.|\\n)*/ & ~/(.|\\n)*" + re.escape(THINK_END).replace(
            "/", "\\/") + "(.|\\n)*/")
    if reply_lark is None:   # free text, special tokens included (a tool-call marker, ...)
        specials = sorted(i for t, i in (special_tokens or {}).items()
                          if i not in set(end_token_ids))
        lines.append("reply: reply_item*")
        lines.append(" | ".join(["reply_item: REPLY_TEXT", *(f"<[{i}]>" for i in specials)]))
        lines.append("REPLY_TEXT: /(.|\\n)+/")
        return "\n".join(lines) + "\n"
    lines.append("reply: reply_start")
    return "\n".join(lines) + "\n" + _rename_start(reply_lark, "reply_start")
