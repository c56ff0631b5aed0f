"""Anthropic Messages API: handlers, content blocks out of parser events, and the SSE stream.

The prompt side (blocks -> chat messages -> prompt + cache breakpoints) is anthropic_prompt.py."""
from __future__ import annotations

import json
import logging
from typing import AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request

from tokenfactory.api import caching, structured
from tokenfactory.api.anthropic_models import CountTokensRequest, MessagesRequest
from tokenfactory.api.anthropic_prompt import AnthropicPrompt, PromptBuilder
from tokenfactory.api.anthropic_thinking import sign_thinking
from tokenfactory.api.errors import APIError, anthropic_error_body
from tokenfactory.api.serving import (Finished, Generation, GenerationFailed, ServingContext,
                                      cost_headers, Started, TextEvent, make_sampling_params)
from tokenfactory.api.sse import (ANTHROPIC_PING, SSE_COMMENT, SSE_HEADERS, anthropic_frame,
                                  collect_unless_disconnected, with_keepalive)
from tokenfactory.api.trace import trace_of
from tokenfactory.text.reasoning_parser import ThinkingDelta, ThinkingEnd
from tokenfactory.text.tool_parser_base import (TextDelta, ToolCallArgsDelta, ToolCallEnd,
                                               ToolCallStart)
from tokenfactory.text.tool_parsers import reply_parser

log = logging.getLogger("tokenfactory.api")


# ---------------------------------------------------------------------- response building
def new_tool_use_id(ctx: ServingContext) -> str:
    return ctx.new_request_id("toolu_")


class ContentAssembler:
    """Parser events -> Anthropic content blocks, as stream events and as the final list."""

    def __init__(self, ctx: ServingContext, omit_thinking: bool = False):
        self.ctx = ctx
        self.omit_thinking = omit_thinking   # thinking.display "omitted"
        self._thought = ""                   # the open thinking block's text
        self.blocks: list[dict] = []
        self._open: str | None = None
        self._json: dict[int, str] = {}
        self.num_tool_calls = 0

    def _close(self) -> list[dict]:
        if self._open is None:
            return []
        out = []
        if self._open == "thinking":   # signed when complete (checked when it comes back)
            block = self.blocks[-1]
            block["signature"] = sign_thinking(self._thought, omitted=self.omit_thinking)
            out.append({"type": "content_block_delta", "index": len(self.blocks) - 1,
                        "delta": {"type": "signature_delta", "signature": block["signature"]}})
        self._open = None
        return out + [{"type": "content_block_stop", "index": len(self.blocks) - 1}]

    def feed(self, ev) -> list[dict]:
        out: list[dict] = []
        if isinstance(ev, ThinkingDelta):
            if self._open != "thinking":
                out += self._close()
                self.blocks.append({"type": "thinking", "thinking": "", "signature": ""})
                self._open, self._thought = "thinking", ""
                out.append({"type": "content_block_start", "index": len(self.blocks) - 1,
                            "content_block": {"type": "thinking", "thinking": "",
                                              "signature": ""}})
            self._thought += ev.text
            if not self.omit_thinking:
                self.blocks[-1]["thinking"] += ev.text
                out.append({"type": "content_block_delta", "index": len(self.blocks) - 1,
                            "delta": {"type": "thinking_delta", "thinking": ev.text}})
        elif isinstance(ev, ThinkingEnd):
            if self._open == "thinking":
                out += self._close()
        elif isinstance(ev, (TextEvent, TextDelta)):
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


def stop_reason(out, num_tool_calls: int, limited_by: str | None = None
                ) -> tuple[str, str | None]:
    """``limited_by``: why the served max_tokens is below the requested one (clamp policy).
    The client's own budget was not reached then, so ``max_tokens`` would mislead it (Claude
    Code treats it as an error and retries): the operator's --max-output-tokens cap ends the
    turn (``end_turn``), a full context window is ``model_context_window_exceeded``."""
    comp = out.outputs[0]
    if comp.finish_reason == "length":
        if limited_by == "output_cap":
            return "end_turn", None
        if limited_by == "context":
            return "model_context_window_exceeded", None
        return "max_tokens", None
    if isinstance(comp.stop_reason, str):
        return "stop_sequence", comp.stop_reason
    if num_tool_calls:
        return "tool_use", None
    return "end_turn", None


# ---------------------------------------------------------------------- handlers
async def count_tokens(ctx: ServingContext, body: CountTokensRequest) -> dict:
    ctx.resolve_model(body.model)
    builder = PromptBuilder(ctx, body)   # validates (cheap); rendering waits for build()
    # A prompt that cannot fit the context is refused from its size alone (it could never be
    # served; counting it would cost a tokenizer pass over all of it).
    ctx.check_prompt_bytes(builder.text_bytes(), reserve=0)
    prompt = await ctx.off_loop(builder.build)
    return {"input_tokens": len(prompt.ids)}


async def create_message(ctx: ServingContext, request: Request, body: MessagesRequest,
                         tenant: str | None, request_id: str):

    trace = trace_of(request)   # None unless tracing is installed (api/trace.py)
    ctx.resolve_model(body.model)
    # Cheap rejections first: validation, the prompt's size against the context, a full queue;
    # only then rendering + tokenizing (~0.2 s for a 20K-token prompt), off the event loop.
    builder = PromptBuilder(ctx, body)
    ctx.check_prompt_bytes(builder.text_bytes())
    ctx.check_capacity(tenant, 529)
    prompt = await ctx.off_loop(builder.build)
    if trace is not None:
        trace.mark_tokenized(len(prompt.ids))
    max_tokens, clamped = ctx.effective_max_tokens(len(prompt.ids), body.max_tokens)
    cap = ctx.options.max_output_tokens
    limited_by = None if not clamped else ("output_cap" if cap and max_tokens == cap else "context")
    # output_config.format: compiled off the event loop (a cache hit for the engine afterwards)
    structured_output = await ctx.off_loop(structured.from_anthropic, body, ctx.tokenizer)
    if structured_output is None and prompt.tool_constraint is not None:
        structured_output = await ctx.off_loop(structured.tool_constraint, ctx.tokenizer,
                                               **prompt.tool_constraint)
    streamed_args = structured_output is not None and prompt.tool_constraint is not None
    constrained = structured_output is not None
    # A reasoning template's reply reasons first: a budget (thinking.budget_tokens, effort)
    # closes the section by grammar, and a constrained reply keeps its section in front.
    plan = prompt.reasoning_plan
    reasons_by_grammar = prompt.thinks and (plan.budget is not None or constrained)
    if reasons_by_grammar:
        structured_output = await ctx.off_loop(structured.with_reasoning, ctx.tokenizer,
                                               structured_output, plan.budget,
                                               inside=prompt.thinking_opened)
    params = make_sampling_params(
        max_tokens=max_tokens, structured_output=structured_output,
        temperature=ctx.sampling_default("temperature", body.temperature, 1.0),
        top_p=ctx.sampling_default("top_p", body.top_p, 1.0),
        top_k=ctx.sampling_default("top_k", body.top_k, 0) or 0,
        repetition_penalty=ctx.sampling_default("repetition_penalty", None, 1.0),
        stop=list(body.stop_sequences or []),
        ignore_eos=bool(body.ignore_eos), min_tokens=min(body.min_tokens or 0, max_tokens),
        seed=body.seed)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in prompt.tools or []}
    tc = body.tool_choice
    # the format's calls (held to one where no grammar enforces it), behind the splitter of a
    # leading <think> section (it becomes a thinking block)
    parser = reply_parser(
        prompt.parser_name if prompt.use_parser and (not constrained or streamed_args) else None,
        stream_arguments=streamed_args, tools=schemas,
        one_call=not constrained and tc is not None and (tc.disable_parallel_tool_use
                                                         or tc.type in ("any", "tool")),
        reasoning=prompt.reasoning and (not constrained or reasons_by_grammar),
        inside=prompt.thinking_opened)
    msg_id = ctx.new_request_id("msg_")
    gen = Generation(ctx, msg_id, prompt.ids, params, cache_salt=tenant,
                     breakpoints=prompt.engine_breakpoints, parser=parser,
                     overload_status=529, trace=trace)
    await gen.start()
    headers = {"request-id": request_id, "x-request-id": request_id,
               "x-tokenfactory-max-tokens": str(max_tokens)}
    if clamped:
        headers["x-tokenfactory-max-tokens-clamped"] = f"{body.max_tokens}->{max_tokens}"
    if body.stream:
        frames = _stream(ctx, gen, prompt, body.model, msg_id, limited_by)
        frames = with_keepalive(frames, ctx.options.ping_interval, ANTHROPIC_PING,
                                before_first=SSE_COMMENT)
        return StreamingResponse(frames,
                                 media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
    message = await collect_unless_disconnected(request, _collect(ctx, gen, prompt, body.model,
                                                                  msg_id, limited_by))
    return JSONResponse(message, headers={**headers, **cost_headers(gen)})


def _usage(ctx: ServingContext, prompt: AnthropicPrompt, out) -> dict:
    return caching.cache_usage(len(prompt.ids), out.num_cached_tokens, prompt.engine_breakpoints,
                               ctx.block_size, ctx.prefix_caching).anthropic()


async def _collect(ctx, gen: Generation, prompt: AnthropicPrompt, model: str, msg_id: str,
                   limited_by: str | None) -> dict:
    asm = ContentAssembler(ctx, prompt.omit_thinking)
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
    reason, seq = stop_reason(final, asm.num_tool_calls, limited_by)
    usage["output_tokens"] = len(final.outputs[0].token_ids)
    ctx.metrics.cache_creation_tokens.inc(usage["cache_creation_input_tokens"])
    return {"id": msg_id, "type": "message", "role": "assistant", "model": model,
            "content": asm.blocks, "stop_reason": reason, "stop_sequence": seq, "usage": usage}


async def _stream(ctx, gen: Generation, prompt: AnthropicPrompt, model: str,
                  msg_id: str, limited_by: str | None) -> AsyncIterator[str]:
    asm = ContentAssembler(ctx, prompt.omit_thinking)
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
                yield ANTHROPIC_PING   # as the API streams: a ping right after message_start
            elif isinstance(ev, Finished):
                for e in asm.finish():
                    yield anthropic_frame(e)
                reason, seq = stop_reason(ev.output, asm.num_tool_calls, limited_by)
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
