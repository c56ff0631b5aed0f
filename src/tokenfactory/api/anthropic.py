"""Anthropic Messages API: request -> chat-template prompt (+ cache breakpoints) -> response/SSE."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request

from tokenfactory.api import caching
from tokenfactory.api.anthropic_models import (CountTokensRequest, DocumentBlock, ImageBlock,
                                               MessagesRequest, RedactedThinkingBlock, TextBlock,
                                               ThinkingBlock, ToolResultBlock, ToolUseBlock)
from tokenfactory.api.errors import APIError, anthropic_error_body
from tokenfactory.api.serving import (Finished, Generation, GenerationFailed, ServingContext,
                                      Started, TextEvent, make_sampling_params)
from tokenfactory.api.sse import ANTHROPIC_PING, SSE_HEADERS, anthropic_frame, with_keepalive
from tokenfactory.engine.request import CacheBreakpoint

log = logging.getLogger("tokenfactory.api")
TEXT_JOIN = "\n\n"   # between text blocks of one turn, and between system blocks


# ---------------------------------------------------------------- request -> chat messages
def _unsupported(block) -> None:
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
        _unsupported(b)
        parts.append(b.text)
    return "\n".join(parts)


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    return TEXT_JOIN.join(b.text for b in content if isinstance(b, TextBlock))


def _merge(chat: list[dict], msg: dict) -> None:
    """Append, merging consecutive same-role turns (never tool results)."""
    prev = chat[-1] if chat else None
    if prev is not None and prev["role"] == msg["role"] and msg["role"] != "tool":
        texts = [t for t in (prev.get("content", ""), msg.get("content", "")) if t]
        prev["content"] = TEXT_JOIN.join(texts)
        if msg.get("tool_calls"):
            prev["tool_calls"] = prev.get("tool_calls", []) + msg["tool_calls"]
        return
    chat.append(msg)


def _convert_message(msg, content, chat: list[dict], system_role: str) -> None:
    if isinstance(content, str):
        role = system_role if msg.role == "system" else msg.role
        _merge(chat, {"role": role, "content": content})
        return
    if msg.role == "assistant":
        texts, calls = [], []
        for b in content:
            _unsupported(b)
            if isinstance(b, TextBlock):
                texts.append(b.text)
            elif isinstance(b, ToolUseBlock):
                calls.append({"id": b.id, "type": "function",
                              "function": {"name": b.name, "arguments": b.input}})
            # thinking / redacted_thinking: not shown to this model
        out: dict[str, Any] = {"role": "assistant", "content": TEXT_JOIN.join(texts)}
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
        _unsupported(b)
        if isinstance(b, TextBlock):
            pending.append(b.text)
        elif isinstance(b, ToolResultBlock):
            flush()
            chat.append({"role": "tool", "tool_call_id": b.tool_use_id,
                         "content": _tool_result_text(b)})
        elif isinstance(b, ToolUseBlock):
            raise APIError(400, f"tool_use blocks may only appear in assistant messages "
                                f"(found one in a {msg.role} message)")
    flush()


@dataclass
class AnthropicPrompt:
    text: str
    ids: list[int]
    tools: list[dict] | None
    resolved: list[caching.ResolvedBreakpoint] = field(default_factory=list)
    engine_breakpoints: list[CacheBreakpoint] = field(default_factory=list)
    parser_prefill: str = ""
    use_parser: bool = False


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
        self._validate()

    # ------------------------------------------------------------ validation
    def _validate(self) -> None:
        req = self.req
        seen_ids: set[str] = set()
        for i, m in enumerate(req.messages):
            if isinstance(m.content, str):
                continue
            for b in m.content:
                _unsupported(b)
                if isinstance(b, ToolUseBlock):
                    seen_ids.add(b.id)
                elif isinstance(b, ToolResultBlock):
                    if b.tool_use_id not in seen_ids:
                        raise APIError(400, f"messages.{i}: tool_result block refers to "
                                            f"tool_use_id '{b.tool_use_id}', which no earlier "
                                            "tool_use block has")
                    if not isinstance(b.content, str):
                        for inner in b.content or []:
                            _unsupported(inner)
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
            _convert_message(msg, content, chat, self.system_role)
        tool_dicts = [{"type": "function",
                       "function": {"name": t.name, "description": t.description or "",
                                    "parameters": t.input_schema}} for t in tools]
        return chat, (tool_dicts or None)

    def _render(self, chat, tools, *, final: bool) -> str:
        tok = self.ctx.tokenizer
        if not chat:
            raise APIError(400, "messages: the conversation has no content to answer")
        if not final:
            return tok.apply_chat_template(chat, tools=tools, add_generation_prompt=False)
        cont = (chat[-1]["role"] == "assistant" and not chat[-1].get("tool_calls"))
        if cont and not chat[-1].get("content"):
            chat = chat[:-1]
            cont = False
        if not chat:
            raise APIError(400, "messages: the conversation has no content to answer")
        return tok.apply_chat_template(chat, tools=tools, add_generation_prompt=not cont,
                                       continue_final_message=cont)

    def render_full(self) -> tuple[str, list[dict] | None, bool]:
        from tokenfactory.text.chat_template import ChatTemplateError
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
        from tokenfactory.text.chat_template import ChatTemplateError
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

    def tool_prefill(self, continuing: bool) -> tuple[str, bool]:
        """(text appended after the generation prompt, whether tool calls are parsed)."""
        from tokenfactory.text.tool_parsers import render_tool_call_text
        tc, parser = self.req.tool_choice, self.ctx.parser_name
        if not self.tools or parser is None or (tc is not None and tc.type == "none"):
            return "", False
        if tc is None or tc.type == "auto" or continuing:
            return "", True
        if tc.type == "tool":
            text = render_tool_call_text(tc.name, {"__tf_args__": 0}, parser)
            return text[:text.index('{"__tf_args__"')], True
        text = render_tool_call_text("__tf_name__", {}, parser)  # "any": the model picks the name
        return text[:text.index("__tf_name__")], True

    def build(self) -> AnthropicPrompt:
        specs = self.breakpoint_specs()
        caching.validate_breakpoints(specs)
        text, tools, continuing = self.render_full()
        prefill, use_parser = self.tool_prefill(continuing)
        ids = self.ctx.encode(text + prefill)
        resolved = caching.resolve_breakpoints(specs, ids, self.render_truncated, self.ctx.encode)
        bps = caching.engine_breakpoints(resolved, self.ctx.options.min_cache_tokens)
        return AnthropicPrompt(text + prefill, ids, tools, resolved, bps, prefill, use_parser)


# ---------------------------------------------------------------------- response building
def new_tool_use_id(ctx: ServingContext) -> str:
    return ctx.new_request_id("toolu_")


class ContentAssembler:
    """Parser events -> Anthropic content blocks, as stream events and as the final list."""

    def __init__(self, ctx: ServingContext):
        self.ctx = ctx
        self.blocks: list[dict] = []
        self._open: str | None = None
        self._json: dict[int, str] = {}
        self.num_tool_calls = 0

    def _close(self) -> list[dict]:
        if self._open is None:
            return []
        self._open = None
        return [{"type": "content_block_stop", "index": len(self.blocks) - 1}]

    def feed(self, ev) -> list[dict]:
        from tokenfactory.text.tool_parsers import (TextDelta, ToolCallArgsDelta, ToolCallEnd,
                                                    ToolCallStart)
        out: list[dict] = []
        if isinstance(ev, (TextEvent, TextDelta)):
            if not ev.text:
                return out
            if self._open != "text":
                out += self._close()
                self.blocks.append({"type": "text", "text": ""})
                self._open = "text"
                out.append({"type": "content_block_start", "index": len(self.blocks) - 1,
                            "content_block": {"type": "text", "text": ""}})
            self.blocks[-1]["text"] += ev.text
            out.append({"type": "content_block_delta", "index": len(self.blocks) - 1,
                        "delta": {"type": "text_delta", "text": ev.text}})
        elif isinstance(ev, ToolCallStart):
            out += self._close()
            block = {"type": "tool_use", "id": new_tool_use_id(self.ctx), "name": ev.name,
                     "input": {}}
            self.blocks.append(block)
            self._open = "tool_use"
            self.num_tool_calls += 1
            self._json[len(self.blocks) - 1] = ""
            out.append({"type": "content_block_start", "index": len(self.blocks) - 1,
                        "content_block": dict(block, input={})})
        elif isinstance(ev, ToolCallArgsDelta):
            idx = len(self.blocks) - 1
            self._json[idx] += ev.json_fragment
            out.append({"type": "content_block_delta", "index": idx,
                        "delta": {"type": "input_json_delta", "partial_json": ev.json_fragment}})
        elif isinstance(ev, ToolCallEnd):
            idx = len(self.blocks) - 1
            self.blocks[idx]["input"] = ev.arguments
            if not self._json.get(idx):  # no fragments were streamed: send the whole object
                out.append({"type": "content_block_delta", "index": idx,
                            "delta": {"type": "input_json_delta",
                                      "partial_json": json.dumps(ev.arguments, ensure_ascii=False)}})
            out += self._close()
        return out

    def finish(self) -> list[dict]:
        return self._close()


def stop_reason(out, num_tool_calls: int) -> tuple[str, str | None]:
    comp = out.outputs[0]
    if comp.finish_reason == "length":
        return "max_tokens", None
    if isinstance(comp.stop_reason, str):
        return "stop_sequence", comp.stop_reason
    if num_tool_calls:
        return "tool_use", None
    return "end_turn", None


# ---------------------------------------------------------------------- handlers
def count_tokens(ctx: ServingContext, body: CountTokensRequest) -> dict:
    ctx.resolve_model(body.model)
    prompt = PromptBuilder(ctx, body).build()
    return {"input_tokens": len(prompt.ids)}


async def create_message(ctx: ServingContext, request: Request, body: MessagesRequest,
                         tenant: str | None, request_id: str):
    from tokenfactory.api.server import collect_unless_disconnected
    from tokenfactory.text.tool_parsers import get_tool_parser

    ctx.resolve_model(body.model)
    prompt = PromptBuilder(ctx, body).build()
    max_tokens, clamped = ctx.effective_max_tokens(len(prompt.ids), body.max_tokens)
    params = make_sampling_params(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0, stop=list(body.stop_sequences or []))
    parser = get_tool_parser(ctx.parser_name)() if prompt.use_parser else None
    msg_id = ctx.new_request_id("msg_")
    gen = Generation(ctx, msg_id, prompt.ids, params, cache_salt=tenant,
                     breakpoints=prompt.engine_breakpoints, parser=parser,
                     parser_prefill=prompt.parser_prefill, overload_status=529)
    await gen.start()
    headers = {"request-id": request_id, "x-request-id": request_id,
               "x-tokenfactory-max-tokens": str(max_tokens)}
    if clamped:
        headers["x-tokenfactory-max-tokens-clamped"] = f"{body.max_tokens}->{max_tokens}"
    if body.stream:
        frames = _stream(ctx, gen, prompt, body.model, msg_id)
        return StreamingResponse(with_keepalive(frames, ctx.options.ping_interval, ANTHROPIC_PING),
                                 media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
    message = await collect_unless_disconnected(request, _collect(ctx, gen, prompt, body.model,
                                                                  msg_id))
    return JSONResponse(message, headers=headers)


def _usage(ctx: ServingContext, prompt: AnthropicPrompt, out) -> dict:
    return caching.cache_usage(len(prompt.ids), out.num_cached_tokens, prompt.engine_breakpoints,
                               ctx.block_size, ctx.prefix_caching).anthropic()


async def _collect(ctx, gen: Generation, prompt: AnthropicPrompt, model: str, msg_id: str) -> dict:
    asm = ContentAssembler(ctx)
    usage, final = None, None
    try:
        async for ev in gen.events():
            if isinstance(ev, Started):
                usage = _usage(ctx, prompt, ev.output)
            elif isinstance(ev, Finished):
                final = ev.output
            else:
                asm.feed(ev)
    except GenerationFailed as exc:
        raise APIError(500, f"generation failed: {exc}") from None
    asm.finish()
    reason, seq = stop_reason(final, asm.num_tool_calls)
    usage["output_tokens"] = len(final.outputs[0].token_ids)
    ctx.metrics.cache_creation_tokens.inc(usage["cache_creation_input_tokens"])
    return {"id": msg_id, "type": "message", "role": "assistant", "model": model,
            "content": asm.blocks, "stop_reason": reason, "stop_sequence": seq, "usage": usage}


async def _stream(ctx, gen: Generation, prompt: AnthropicPrompt, model: str,
                  msg_id: str) -> AsyncIterator[str]:
    asm = ContentAssembler(ctx)
    usage = None
    try:
        async for ev in gen.events():
            if isinstance(ev, Started):
                usage = _usage(ctx, prompt, ev.output)
                ctx.metrics.cache_creation_tokens.inc(usage["cache_creation_input_tokens"])
                yield anthropic_frame({"type": "message_start", "message": {
                    "id": msg_id, "type": "message", "role": "assistant", "model": model,
                    "content": [], "stop_reason": None, "stop_sequence": None,
                    "usage": {**usage, "output_tokens": 0}}})
            elif isinstance(ev, Finished):
                for e in asm.finish():
                    yield anthropic_frame(e)
                reason, seq = stop_reason(ev.output, asm.num_tool_calls)
                yield anthropic_frame({"type": "message_delta",
                                       "delta": {"stop_reason": reason, "stop_sequence": seq},
                                       "usage": {**usage,
                                                 "output_tokens": len(ev.output.outputs[0].token_ids)}})
                yield anthropic_frame({"type": "message_stop"})
            else:
                for e in asm.feed(ev):
                    yield anthropic_frame(e)
    except APIError as exc:  # e.g. the engine died between start() and the first output
        yield anthropic_frame(anthropic_error_body(exc.status, exc.message))
    except GenerationFailed as exc:
        yield anthropic_frame(anthropic_error_body(500, f"generation failed: {exc}"))
    except Exception as exc:  # noqa: BLE001 - never a half-formed stream without an error event
        log.exception("stream %s failed", msg_id)
        yield anthropic_frame(anthropic_error_body(500, f"internal error: {type(exc).__name__}"))
