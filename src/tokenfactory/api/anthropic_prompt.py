"""Anthropic request -> the prompt the model sees, and where its cache breakpoints fall.

Blocks become chat-template messages (anthropic_messages.py); the prompt is rendered with the
model's own template; each ``cache_control`` block is mapped to a token position (see
caching.py for how, and for the usage arithmetic).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenfactory.api import caching
from tokenfactory.api.anthropic_messages import TEXT_JOIN, convert_message, reject_unsupported
from tokenfactory.api.anthropic_models import (MessagesRequest, RedactedThinkingBlock, TextBlock,
                                               ThinkingBlock, ToolResultBlock, ToolUseBlock)
from tokenfactory.api.anthropic_thinking import thinking_signature_ok
from tokenfactory.api.errors import APIError
from tokenfactory.api.serving import ServingContext
from tokenfactory.engine.request import CacheBreakpoint
from tokenfactory.text.chat_template import ChatTemplateError, with_generic_tools
from tokenfactory.text.reasoning import ReasoningPlan, plan_reasoning
from tokenfactory.text.reasoning_parser import THINK_START, template_has_reasoning

# Anthropic's output_config.effort levels (ascending)
EFFORT_LEVELS = ("low", "medium", "high", "xhigh", "max")


def _effort(req: MessagesRequest) -> str | None:
    """``output_config.effort``, checked (400 for a level the API does not have)."""
    config = (req.model_extra or {}).get("output_config")
    if not isinstance(config, dict) or config.get("effort") is None:
        return None
    effort = config["effort"]
    if effort not in EFFORT_LEVELS:
        raise APIError(400, f"output_config.effort: must be one of {', '.join(EFFORT_LEVELS)}; "
                            f"got {str(effort)[:40]!r}", param="output_config.effort")
    return effort


@dataclass
class AnthropicPrompt:
    text: str
    ids: list[int]
    tools: list[dict] | None
    engine_breakpoints: list[CacheBreakpoint] = field(default_factory=list)
    use_parser: bool = False
    parser_name: str | None = None
    # keyword arguments of structured.tool_constraint when the reply's tool calls are
    # constrained by a grammar (a forced call, strict tools, the generic format, no parallel)
    tool_constraint: dict | None = None
    reasoning: bool = False   # the template has a <think> section: replies may open with one
    # what the reply does with its reasoning section (the template switch, a token budget)
    reasoning_plan: ReasoningPlan = field(default_factory=ReasoningPlan)
    continuing: bool = False   # the reply continues a prefilled assistant turn
    omit_thinking: bool = False   # thinking.display "omitted"

    @property
    def thinking_opened(self) -> bool:
        """The generation prompt itself opened the reasoning section (``…<think>``)."""
        return self.text.rstrip().endswith(THINK_START)

    @property
    def thinks(self) -> bool:
        """The reply opens with a reasoning section: a reasoning template whose prompt did not
        close the section (Qwen3's switch off renders ``<think>\n\n</think>`` itself)."""
        return (self.reasoning and not self.continuing
                and not self.text.rstrip().endswith("</think>"))


class PromptBuilder:
    """Turns one Anthropic request into the prompt the model sees, and its cache breakpoints."""

    def __init__(self, ctx: ServingContext, req: MessagesRequest):
        self.ctx = ctx
        self.req = req
        self.tools = [t for t in (req.tools or []) if t.type in (None, "custom")]
        blocks = ([TextBlock(type="text", text=req.system)] if isinstance(req.system, str)
                  else list(req.system or []))
        if ctx.strip_re is not None:
            blocks = [b.model_copy(update={"text": ctx.strip_re.sub("", b.text)}) for b in blocks]
        self.system_blocks = blocks
        self.system_role = "system"
        # A template without a tool section gets the tools described in its system turn, and
        # calls come back in the Hermes format (docs/api.md, "Tools on any template").
        self.generic = bool(self.tools) and not ctx.template_shows_tools
        self.parser_name = "hermes" if self.generic else ctx.parser_name
        template = getattr(ctx.tokenizer, "chat_template", None) or ""
        self.reasoning = template_has_reasoning(template)
        # ``thinking`` and ``output_config.effort``: a template with a reasoning switch
        # (Qwen3's ``enable_thinking``) is rendered off for {"type": "disabled"}, on for
        # enabled / adaptive; a budget (budget_tokens, or an effort level's share of
        # max_tokens) closes the section by grammar when it is spent (text/reasoning.py).
        effort = _effort(req)
        self.reasoning_plan = ReasoningPlan()
        if self.reasoning:
            t = req.thinking
            self.reasoning_plan = plan_reasoning(
                template=template, thinking_type=t.type if t else None,
                budget_tokens=t.budget_tokens if t else None, effort=effort,
                max_tokens=req.max_tokens or 0)
        self.template_switches: dict[str, Any] = {}
        if self.reasoning_plan.switch is not None:
            self.template_switches["enable_thinking"] = self.reasoning_plan.switch
        self._validate()

    # ------------------------------------------------------------ validation
    def _validate(self) -> None:
        req = self.req
        seen_ids: set[str] = set()
        last = len(req.messages) - 1
        for i, m in enumerate(req.messages):
            # as the real API: only a final assistant turn (a prefill) may be empty
            if not m.content and not (i == last and m.role == "assistant"):
                raise APIError(400, f"messages.{i}: all messages must have non-empty content "
                                    "except for the optional final assistant message")
            if isinstance(m.content, str):
                continue
            for k, b in enumerate(m.content):
                reject_unsupported(b)
                # a model that reasons gets its thinking back only as this server signed it
                # (a model without reasoning never sees thinking blocks: they are ignored)
                if (self.reasoning and isinstance(b, ThinkingBlock)
                        and not thinking_signature_ok(b.thinking, b.signature)):
                    raise APIError(400, f"messages.{i}.content.{k}: invalid signature in "
                                        "thinking block (changed, or not issued by this server)")
                if self.reasoning and isinstance(b, RedactedThinkingBlock):
                    raise APIError(400, f"messages.{i}.content.{k}: redacted_thinking blocks "
                                        "were not issued by this server (it cannot read them)")
                if isinstance(b, TextBlock) and not b.text:
                    raise APIError(400, f"messages.{i}.content.{k}: text content blocks must "
                                        "be non-empty")
                if isinstance(b, ToolUseBlock):
                    if b.id in seen_ids:
                        raise APIError(400, f"messages.{i}.content.{k}: tool_use ids must be "
                                            f"unique, '{b.id}' appears twice")
                    seen_ids.add(b.id)
                elif isinstance(b, ToolResultBlock):
                    if b.tool_use_id not in seen_ids:
                        raise APIError(400, f"messages.{i}: tool_result block refers to "
                                            f"tool_use_id '{b.tool_use_id}', which no earlier "
                                            "tool_use block has")
                    if not isinstance(b.content, str):
                        for inner in b.content or []:
                            reject_unsupported(inner)
        names = [t.name for t in self.tools]
        if len(set(names)) != len(names):
            raise APIError(400, "tools: tool names must be unique")
        tc = req.tool_choice
        if tc is not None and tc.type == "tool" and tc.name not in names:
            raise APIError(400, f"tool_choice names tool '{tc.name}', which is not in tools")
        if tc is not None and tc.type in ("any", "tool") and not self.tools:
            raise APIError(400, f"tool_choice.type '{tc.type}' needs at least one tool")
        stops = req.stop_sequences or []
        if len(stops) > self.ctx.options.max_stop_sequences:
            raise APIError(400, f"stop_sequences: at most {self.ctx.options.max_stop_sequences} "
                                f"are allowed, got {len(stops)}")

    # ------------------------------------------------------------ breakpoints
    def breakpoint_specs(self) -> list[caching.BreakpointSpec]:
        specs = []

        def add(cc, pos):
            if cc is not None:
                specs.append(caching.BreakpointSpec(pos, cc.ttl or "5m"))

        for i, t in enumerate(self.tools):
            add(t.cache_control, ("tools", i))
        for j, b in enumerate(self.system_blocks):
            add(b.cache_control, ("system", j))
        last_pos = None
        for m, msg in enumerate(self.req.messages):
            if isinstance(msg.content, str):
                last_pos = ("msg", m, -1)
                continue
            for k, b in enumerate(msg.content):
                add(getattr(b, "cache_control", None), ("msg", m, k))
                last_pos = ("msg", m, k)
        if self.req.cache_control is not None and last_pos is not None:
            if not any(s.position == last_pos for s in specs):
                add(self.req.cache_control, last_pos)
        return specs

    # ------------------------------------------------------------ conversion
    def chat(self, cut=None) -> tuple[list[dict], list[dict] | None]:
        """Chat-template messages and tools, optionally cut right after block ``cut``."""
        tools, system, messages = self.tools, self.system_blocks, list(self.req.messages)
        last_content = None
        if cut is not None:
            if cut[0] == "tools":
                tools, system, messages = tools[:cut[1] + 1], [], []
            elif cut[0] == "system":
                system, messages = system[:cut[1] + 1], []
            else:
                m, k = cut[1], cut[2]
                messages = messages[:m + 1]
                content = messages[m].content
                last_content = content if k < 0 else content[:k + 1]
        chat: list[dict] = []
        sys_text = TEXT_JOIN.join(b.text for b in system if b.text.strip())
        if sys_text:
            chat.append({"role": "system", "content": sys_text})
        for i, msg in enumerate(messages):
            content = last_content if (last_content is not None and i == len(messages) - 1) \
                else msg.content
            convert_message(msg, content, chat, self.system_role, self.reasoning)
        tool_dicts = [{"type": "function",
                       "function": {"name": t.name, "description": t.description or "",
                                    "parameters": t.input_schema}} for t in tools]
        return chat, (tool_dicts or None)

    def _render(self, chat, tools, *, final: bool) -> str:
        tok = self.ctx.tokenizer
        if self.generic and tools:
            chat, tools = with_generic_tools(chat, tools), None
        if not chat:
            raise APIError(400, "messages: the conversation has no content to answer")
        if not final:
            return tok.apply_chat_template(chat, tools=tools, add_generation_prompt=False,
                                           **self.template_switches)
        cont = (chat[-1]["role"] == "assistant" and not chat[-1].get("tool_calls"))
        if cont and not chat[-1].get("content"):
            chat = chat[:-1]
            cont = False
        if not chat:
            raise APIError(400, "messages: the conversation has no content to answer")
        return tok.apply_chat_template(chat, tools=tools, add_generation_prompt=not cont,
                                       continue_final_message=cont, **self.template_switches)

    def render_full(self) -> tuple[str, list[dict] | None, bool]:
        chat, tools = self.chat()
        if not chat:
            raise APIError(400, "messages: the conversation has no content to answer")
        try:
            return self._render(chat, tools, final=True), tools, chat[-1]["role"] == "assistant"
        except ChatTemplateError as first_err:
            if not any(m.role == "system" for m in self.req.messages):
                raise APIError(400, str(first_err)) from None
            # The template refuses system turns mid-conversation: render them as user turns.
            self.system_role = "user"
            chat, tools = self.chat()
            try:
                return self._render(chat, tools, final=True), tools, chat[-1]["role"] == "assistant"
            except ChatTemplateError as exc:
                raise APIError(400, str(exc)) from None

    def render_truncated(self, cut) -> list[str]:
        chat, tools = self.chat(cut)
        variants = [chat] if chat and cut[0] == "msg" else [
            chat + [{"role": "user", "content": "\u2063"}],
            chat + [{"role": "assistant", "content": "\u2063"}]]
        out = []
        for v in variants:
            try:
                out.append(self._render(v, tools, final=False))
            except ChatTemplateError:
                continue
        return out or [""]

    def tool_mode(self, continuing: bool) -> tuple[bool, dict | None]:
        """(whether tool calls are parsed, the tool_constraint arguments when a grammar
        constrains them: a forced call (``any`` / ``tool``), a strict tool, the generic
        format, or ``disable_parallel_tool_use``; a prefilled reply is never constrained)."""
        tc, parser = self.req.tool_choice, self.parser_name
        if not self.tools or parser is None or (tc is not None and tc.type == "none"):
            return False, None
        choice = {"tool": "named", "any": "required"}.get(tc.type if tc else "auto", "auto")
        parallel = not (tc is not None and tc.disable_parallel_tool_use)
        if continuing or not (choice != "auto" or self.generic or not parallel
                              or any(t.strict for t in self.tools)):
            return True, None
        specs = [(t.name, t.input_schema, bool(t.strict)) for t in self.tools]
        return True, {"tools": specs, "parser_name": parser, "choice": choice,
                      "name": tc.name if choice == "named" else None, "parallel": parallel}

    def text_bytes(self) -> int:
        """UTF-8 bytes of the text every chat template shows verbatim: system, user and
        tool-result text (assistant turns are left out: some templates drop parts of earlier
        ones, such as reasoning). The prompt has at least this many bytes, whatever else the
        template adds; ``ServingContext.check_prompt_bytes`` turns it into an early 400."""
        texts = [b.text for b in self.system_blocks]
        for m in self.req.messages:
            if m.role == "assistant":
                continue
            if isinstance(m.content, str):
                texts.append(m.content)
                continue
            for b in m.content:
                if isinstance(b, TextBlock):
                    texts.append(b.text)
                elif isinstance(b, ToolResultBlock):
                    if isinstance(b.content, str):
                        texts.append(b.content)
                    else:
                        texts.extend(x.text for x in b.content or [] if isinstance(x, TextBlock))
        return sum(len(t) if t.isascii() else len(t.encode("utf-8", "surrogatepass"))
                   for t in texts)

    def build(self) -> AnthropicPrompt:
        specs = self.breakpoint_specs()
        caching.validate_breakpoints(specs)
        text, tools, continuing = self.render_full()
        use_parser, constraint = self.tool_mode(continuing)
        ids, offsets = self.ctx.encode_with_offsets(text)
        full = caching.TokenizedText(text, ids, offsets)
        resolved = caching.resolve_breakpoints(specs, full, self.render_truncated, self.ctx.encode,
                                               self.ctx.split_tokens)
        bps = caching.engine_breakpoints(resolved, self.ctx.options.min_cache_tokens)
        return AnthropicPrompt(
            text, ids, tools, engine_breakpoints=bps, use_parser=use_parser,
            parser_name=self.parser_name, tool_constraint=constraint, reasoning=self.reasoning,
            reasoning_plan=self.reasoning_plan, continuing=continuing,
            omit_thinking=bool(self.req.thinking and self.req.thinking.display == "omitted"))
