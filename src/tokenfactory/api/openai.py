"""OpenAI-compatible /v1/chat/completions and /v1/completions on the same engine.

There are no explicit breakpoints here; automatic prefix caching still applies and is reported
as ``usage.prompt_tokens_details.cached_tokens`` (a subset of ``prompt_tokens``).
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request

from tokenfactory.api import structured
from tokenfactory.api.errors import APIError, openai_error_body
from tokenfactory.api.limits import check_nesting
from tokenfactory.api.openai_models import ChatCompletionRequest, CompletionRequest
from tokenfactory.api.serving import (Finished, Generation, GenerationFailed, ServingContext,
                                      cost_headers, Started, TextEvent, make_sampling_params)
from tokenfactory.api.sse import (OPENAI_KEEPALIVE, SSE_HEADERS, collect_unless_disconnected,
                                  openai_frame, with_keepalive)
from tokenfactory.api.trace import trace_of
from tokenfactory.text.chat_template import ChatTemplateError
from tokenfactory.text.tool_parsers import (TextDelta, ToolCallArgsDelta, ToolCallEnd,
                                            ToolCallStart, get_tool_parser, render_tool_call_text)

log = logging.getLogger("tokenfactory.api")


# ------------------------------------------------------------------------ prompt
def _content_text(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for p in content:
        if p.type in ("text", "input_text"):
            parts.append(p.text or "")
        elif p.type in ("image_url", "input_image", "image"):
            raise APIError(400, "this model does not accept image input", param="messages")
        elif p.type in ("input_audio", "audio"):
            raise APIError(400, "this model does not accept audio input", param="messages")
        elif p.type in ("file", "document"):
            raise APIError(400, "this model does not accept document input", param="messages")
        else:
            raise APIError(400, f"unsupported content part type '{p.type}'", param="messages")
    return "\n\n".join(parts)


def _chat_messages(body: ChatCompletionRequest) -> list[dict]:
    out = []
    for m in body.messages:
        role = "system" if m.role == "developer" else m.role
        msg: dict[str, Any] = {"role": role, "content": _content_text(m.content)}
        if m.tool_calls:
            calls = []
            for tc in m.tool_calls:
                args = tc.function.arguments
                if isinstance(args, str):
                    try:
                        args = json.loads(args) if args.strip() else {}
                        check_nesting(args, "tool_calls[].function.arguments")
                    except RecursionError:   # the C parser gives up on absurd nesting
                        raise APIError(400, "tool_calls[].function.arguments is nested too "
                                            "deeply", param="messages") from None
                    except ValueError as exc:   # JSONDecodeError is a ValueError
                        msg = (str(exc) if not isinstance(exc, json.JSONDecodeError)
                               else "tool_calls[].function.arguments is not valid JSON")
                        raise APIError(400, msg, param="messages") from None
                calls.append({"id": tc.id, "type": "function",
                              "function": {"name": tc.function.name, "arguments": args}})
            msg["tool_calls"] = calls
        if m.role == "tool":
            msg["tool_call_id"] = m.tool_call_id
        if m.name:
            msg["name"] = m.name
        out.append(msg)
    return out


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _chat_text_bytes(chat: list[dict]) -> int:
    """UTF-8 bytes of the system/user/tool text every template shows verbatim (assistant
    turns are left out: some templates drop parts of earlier ones). See check_prompt_bytes."""
    return sum(_utf8_len(m["content"]) for m in chat
               if m["role"] != "assistant" and isinstance(m.get("content"), str))


def _tool_mode(ctx: ServingContext, body: ChatCompletionRequest) -> tuple[str, str | None]:
    """("none" | "auto" | "required" | "named", name)."""
    names = [t.function.name for t in body.tools or []]
    tc = body.tool_choice
    if not names:
        if tc not in (None, "none", "auto"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return "none", None
    if tc is None or tc == "auto":
        return "auto", None
    if tc in ("none", "required"):
        return tc, None
    if isinstance(tc, dict) and isinstance(tc.get("function"), dict):
        name = tc["function"].get("name")
        if name not in names:
            raise APIError(400, f"tool_choice names function '{name}', which is not in tools",
                           param="tool_choice")
        return "named", name
    raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or "
                        "{'type': 'function', 'function': {'name': ...}}", param="tool_choice")


def _sampling(ctx: ServingContext, body, num_prompt: int, requested: int | None,
              structured_output=None):
    if body.n not in (None, 1):
        raise APIError(400, f"n must be 1 (got {body.n}); several choices are not supported",
                       param="n")
    max_tokens, clamped = ctx.effective_max_tokens(num_prompt, requested)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > ctx.options.max_stop_sequences:
        raise APIError(400, f"stop: at most {ctx.options.max_stop_sequences} sequences",
                       param="stop")
    vocab = getattr(ctx.tokenizer, "vocab_size", None)
    if vocab and any(not 0 <= t < vocab for t in body.stop_token_ids or ()):
        raise APIError(400, f"stop_token_ids must be token ids in [0, {vocab})",
                       param="stop_token_ids")
    kw: dict[str, Any] = dict(
        max_tokens=max_tokens, stop=stop, seed=body.seed,
        temperature=ctx.sampling_default("temperature", body.temperature, 1.0),
        top_p=ctx.sampling_default("top_p", body.top_p, 1.0),
        top_k=ctx.sampling_default("top_k", body.top_k, 0) or 0,
        min_p=ctx.sampling_default("min_p", body.min_p, 0.0),
        presence_penalty=ctx.sampling_default("presence_penalty", body.presence_penalty, 0.0),
        frequency_penalty=ctx.sampling_default("frequency_penalty", body.frequency_penalty, 0.0),
        repetition_penalty=ctx.sampling_default("repetition_penalty", body.repetition_penalty,
                                                1.0),
        ignore_eos=bool(body.ignore_eos),
        min_tokens=body.min_tokens or 0, stop_token_ids=body.stop_token_ids or [],
        structured_output=structured_output)
    return make_sampling_params(**kw), max_tokens, clamped


def _usage(out) -> dict:
    p, c = len(out.prompt_token_ids), max(out.num_cached_tokens, 0)
    n = len(out.outputs[0].token_ids)
    return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n,
            "prompt_tokens_details": {"cached_tokens": c}}


def _finish_reason(out, num_tool_calls: int) -> str:
    comp = out.outputs[0]
    if comp.finish_reason == "length":
        return "length"
    if num_tool_calls and not isinstance(comp.stop_reason, str):
        return "tool_calls"
    return "stop"


def _headers(max_tokens: int, clamped: bool, requested) -> dict:
    h = {"x-tokenfactory-max-tokens": str(max_tokens)}
    if clamped:
        h["x-tokenfactory-max-tokens-clamped"] = f"{requested}->{max_tokens}"
    return h


# ------------------------------------------------------------------ chat completions
async def create_chat_completion(ctx: ServingContext, request: Request,
                                 body: ChatCompletionRequest, tenant: str | None):

    trace = trace_of(request)   # None unless tracing is installed (api/trace.py)
    ctx.resolve_model(body.model)
    mode, name = _tool_mode(ctx, body)
    tools = [{"type": "function", "function": {
        "name": t.function.name, "description": t.function.description or "",
        "parameters": t.function.parameters or {"type": "object", "properties": {}}}}
        for t in body.tools or []] or None
    chat = _chat_messages(body)
    cont = chat[-1]["role"] == "assistant" and not chat[-1].get("tool_calls") \
        and bool(chat[-1].get("content"))
    # Cheap rejections before rendering and tokenizing: the prompt's size, a full queue.
    ctx.check_prompt_bytes(_chat_text_bytes(chat), param="messages")
    ctx.check_capacity(tenant, 429)
    try:
        text = await ctx.off_loop(ctx.tokenizer.apply_chat_template, chat, tools=tools,
                                  add_generation_prompt=not cont, continue_final_message=cont)
    except ChatTemplateError as exc:
        raise APIError(400, str(exc), param="messages") from None
    # response_format: compiled off the event loop (a cache hit for the engine afterwards);
    # a reply constrained to a schema is never parsed for tool calls
    structured_output = await ctx.off_loop(structured.from_openai, body, ctx.tokenizer)
    prefill = ""
    use_parser = mode != "none" and ctx.parser_name is not None and structured_output is None
    if use_parser and not cont and mode == "named":
        t = render_tool_call_text(name, {"__tf_args__": 0}, ctx.parser_name)
        prefill = t[:t.index('{"__tf_args__"')]
    elif use_parser and not cont and mode == "required":
        t = render_tool_call_text("__tf_name__", {}, ctx.parser_name)
        prefill = t[:t.index("__tf_name__")]
    ids = await ctx.off_loop(ctx.encode, text + prefill)
    if trace is not None:
        trace.mark_tokenized(len(ids))
    requested = body.max_completion_tokens or body.max_tokens
    params, max_tokens, clamped = _sampling(ctx, body, len(ids), requested, structured_output)
    parser = get_tool_parser(ctx.parser_name)() if use_parser else None
    cid = ctx.new_request_id("chatcmpl-")
    gen = Generation(ctx, cid, ids, params, cache_salt=tenant, breakpoints=[], parser=parser,
                     parser_prefill=prefill, overload_status=429, trace=trace)
    await gen.start()
    headers = {**_headers(max_tokens, clamped, requested),
               **ctx.tools_dropped_headers(len(tools or []))}
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        frames = _chat_stream(ctx, gen, body.model, cid, created, include_usage)
        return StreamingResponse(with_keepalive(frames, ctx.options.ping_interval, OPENAI_KEEPALIVE),
                                 media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
    result = await collect_unless_disconnected(request, _chat_collect(ctx, gen, body.model, cid,
                                                                      created))
    return JSONResponse(result, headers={**headers, **cost_headers(gen)})


class _ToolCallAccumulator:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx
        self.calls: list[dict] = []

    def feed(self, ev) -> dict | None:
        """A chat delta for this event (None when it adds nothing)."""
        if isinstance(ev, (TextEvent, TextDelta)):
            return {"content": ev.text} if ev.text else None
        if isinstance(ev, ToolCallStart):
            call = {"id": self.ctx.new_request_id("call_"), "type": "function",
                    "function": {"name": ev.name, "arguments": ""}}
            self.calls.append(call)
            return {"tool_calls": [{"index": len(self.calls) - 1, **json.loads(json.dumps(call))}]}
        if isinstance(ev, ToolCallArgsDelta):
            self.calls[-1]["function"]["arguments"] += ev.json_fragment
            return {"tool_calls": [{"index": len(self.calls) - 1,
                                    "function": {"arguments": ev.json_fragment}}]}
        if isinstance(ev, ToolCallEnd):
            if not self.calls[-1]["function"]["arguments"]:
                frag = json.dumps(ev.arguments, ensure_ascii=False)
                self.calls[-1]["function"]["arguments"] = frag
                return {"tool_calls": [{"index": len(self.calls) - 1,
                                        "function": {"arguments": frag}}]}
        return None


async def _chat_collect(ctx, gen: Generation, model: str, cid: str, created: int) -> dict:
    acc = _ToolCallAccumulator(ctx)
    text, final = [], None
    try:
        async for ev in gen.events():
            if isinstance(ev, Finished):
                final = ev.output
            elif not isinstance(ev, Started):
                d = acc.feed(ev)
                if d and "content" in d:
                    text.append(d["content"])
    except GenerationFailed as exc:
        raise APIError(500, f"generation failed: {exc}") from None
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
    if acc.calls:
        message["tool_calls"] = acc.calls
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": _finish_reason(final, len(acc.calls))}],
            "usage": _usage(final)}


async def _chat_stream(ctx, gen: Generation, model: str, cid: str, created: int,
                       include_usage: bool) -> AsyncIterator[str]:
    acc = _ToolCallAccumulator(ctx)

    def chunk(delta: dict, finish: str | None = None) -> str:
        return openai_frame({"id": cid, "object": "chat.completion.chunk", "created": created,
                             "model": model, "choices": [{"index": 0, "delta": delta,
                                                          "logprobs": None,
                                                          "finish_reason": finish}]})
    try:
        async for ev in gen.events():
            if isinstance(ev, Started):
                yield chunk({"role": "assistant", "content": ""})
            elif isinstance(ev, Finished):
                yield chunk({}, _finish_reason(ev.output, len(acc.calls)))
                if include_usage:
                    yield openai_frame({"id": cid, "object": "chat.completion.chunk",
                                        "created": created, "model": model, "choices": [],
                                        "usage": _usage(ev.output)})
            else:
                d = acc.feed(ev)
                if d:
                    yield chunk(d)
    except APIError as exc:
        yield openai_frame(openai_error_body(exc.status, exc.message))
    except GenerationFailed as exc:
        yield openai_frame(openai_error_body(500, f"generation failed: {exc}"))
    except Exception as exc:  # noqa: BLE001 - never a cut stream without an error event
        log.exception("stream %s failed", cid)
        yield openai_frame(openai_error_body(500, f"internal error: {type(exc).__name__}"))
    yield openai_frame("[DONE]")


# ------------------------------------------------------------------------ completions
async def create_completion(ctx: ServingContext, request: Request, body: CompletionRequest,
                            tenant: str | None):

    trace = trace_of(request)   # None unless tracing is installed (api/trace.py)
    ctx.resolve_model(body.model)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, "only one prompt per request is supported", param="prompt")
        prompt = prompt[0]
    # Cheap rejections before tokenizing: the prompt's size (its bytes, or its token count
    # when given as ids), a full queue. Tokenizing then runs off the event loop.
    if isinstance(prompt, str):
        ctx.check_prompt_bytes(_utf8_len(prompt), param="prompt")
    elif len(prompt) >= ctx.context_limit:
        ctx.effective_max_tokens(len(prompt), 1)   # the "prompt is too long" 400
    ctx.check_capacity(tenant, 429)
    if isinstance(prompt, str):
        text, ids = prompt, await ctx.off_loop(ctx.encode, prompt, add_special_tokens=True)
    else:
        text, ids = None, list(prompt)
        vocab = getattr(ctx.tokenizer, "vocab_size", None)
        if vocab and any(not 0 <= i < vocab for i in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
    if not ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    if trace is not None:
        trace.mark_tokenized(len(ids))
    requested = body.max_tokens or 16   # the completions API's documented default
    params, max_tokens, clamped = _sampling(ctx, body, len(ids), requested)
    cid = ctx.new_request_id("cmpl-")
    gen = Generation(ctx, cid, ids, params, cache_salt=tenant, breakpoints=[],
                     overload_status=429, trace=trace)
    await gen.start()
    headers = _headers(max_tokens, clamped, requested)
    created = int(time.time())
    echo = (text if text is not None else ctx.tokenizer.decode(ids)) if body.echo else ""
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        frames = _completion_stream(gen, body.model, cid, created, echo, include_usage)
        return StreamingResponse(with_keepalive(frames, ctx.options.ping_interval, OPENAI_KEEPALIVE),
                                 media_type="text/event-stream", headers={**SSE_HEADERS, **headers})

    async def collect():
        parts, final = [echo], None
        try:
            async for ev in gen.events():
                if isinstance(ev, TextEvent):
                    parts.append(ev.text)
                elif isinstance(ev, Finished):
                    final = ev.output
        except GenerationFailed as exc:
            raise APIError(500, f"generation failed: {exc}") from None
        return {"id": cid, "object": "text_completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "text": "".join(parts), "logprobs": None,
                             "finish_reason": _finish_reason(final, 0)}],
                "usage": _usage(final)}

    result = await collect_unless_disconnected(request, collect())
    return JSONResponse(result, headers={**headers, **cost_headers(gen)})


async def _completion_stream(gen: Generation, model: str, cid: str, created: int, echo: str,
                             include_usage: bool) -> AsyncIterator[str]:
    def chunk(text: str, finish: str | None = None) -> str:
        return openai_frame({"id": cid, "object": "text_completion", "created": created,
                             "model": model, "choices": [{"index": 0, "text": text,
                                                          "logprobs": None,
                                                          "finish_reason": finish}]})
    try:
        async for ev in gen.events():
            if isinstance(ev, Started) and echo:
                yield chunk(echo)
            elif isinstance(ev, TextEvent):
                yield chunk(ev.text)
            elif isinstance(ev, Finished):
                yield chunk("", _finish_reason(ev.output, 0))
                if include_usage:
                    yield openai_frame({"id": cid, "object": "text_completion",
                                        "created": created, "model": model, "choices": [],
                                        "usage": _usage(ev.output)})
    except APIError as exc:
        yield openai_frame(openai_error_body(exc.status, exc.message))
    except GenerationFailed as exc:
        yield openai_frame(openai_error_body(500, f"generation failed: {exc}"))
    except Exception as exc:  # noqa: BLE001 - never a cut stream without an error event
        log.exception("stream %s failed", cid)
        yield openai_frame(openai_error_body(500, f"internal error: {type(exc).__name__}"))
    yield openai_frame("[DONE]")
