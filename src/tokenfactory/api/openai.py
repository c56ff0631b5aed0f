"""OpenAI-compatible /v1/chat/completions: the request's messages through the model's chat
template, tool choice and reasoning effort as parsers and grammars, ``n`` choices.

There are no explicit breakpoints here; automatic prefix caching still applies and is reported
as ``usage.prompt_tokens_details.cached_tokens`` (a subset of ``prompt_tokens``).

The rest of the OpenAI surface: openai_completions.py (/v1/completions), openai_chat_output.py
(the reply as one object or as chunks), openai_choices.py (the ``n`` choices as engine
requests), openai_sampling.py (request fields -> SamplingParams), openai_logprobs.py.
"""
from __future__ import annotations

import functools
import json
import time
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request

from tokenfactory.api import structured
from tokenfactory.api.errors import APIError
from tokenfactory.api.limits import check_nesting
from tokenfactory.api.openai_chat_output import chat_collect, chat_stream
from tokenfactory.api.openai_choices import start_choices, summed_cost_headers
from tokenfactory.api.openai_models import ChatCompletionRequest
from tokenfactory.api.openai_sampling import (choice_params, max_tokens_headers,
                                              sampling_params, utf8_len)
from tokenfactory.api.serving import ServingContext
from tokenfactory.api.sse import (OPENAI_KEEPALIVE, SSE_HEADERS, collect_unless_disconnected,
                                  with_keepalive)
from tokenfactory.api.trace import trace_of
from tokenfactory.text.chat_template import ChatTemplateError, with_generic_tools
from tokenfactory.text.reasoning import ReasoningPlan, effort_budget, plan_reasoning
from tokenfactory.text.reasoning_parser import template_has_reasoning
from tokenfactory.text.tool_parsers import reply_parser


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


def _chat_messages(body: ChatCompletionRequest, reasoning: bool = False) -> list[dict]:
    """The request's messages as chat-template input. ``reasoning``: the template renders
    reasoning back, so an assistant turn's ``reasoning_content`` (the field this server
    returns it in) is passed on as it came."""
    out = []
    for m in body.messages:
        role = "system" if m.role == "developer" else m.role
        msg: dict[str, Any] = {"role": role, "content": _content_text(m.content)}
        thought = (m.model_extra or {}).get("reasoning_content")
        if reasoning and role == "assistant" and thought is not None:
            if not isinstance(thought, str):
                raise APIError(400, "messages[].reasoning_content must be a string",
                               param="messages")
            msg["reasoning_content"] = thought
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


def _chat_text_bytes(chat: list[dict]) -> int:
    """UTF-8 bytes of the system/user/tool text every template shows verbatim (assistant
    turns are left out: some templates drop parts of earlier ones). See check_prompt_bytes."""
    return sum(utf8_len(m["content"]) for m in chat
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


# ------------------------------------------------------------------ chat completions
async def create_chat_completion(ctx: ServingContext, request: Request,
                                 body: ChatCompletionRequest, tenant: str | None):
    trace = trace_of(request)   # None unless tracing is installed (api/trace.py)
    ctx.resolve_model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    mode, name = _tool_mode(ctx, body)
    tools = [{"type": "function", "function": {
        "name": t.function.name, "description": t.function.description or "",
        "parameters": t.function.parameters or {"type": "object", "properties": {}}}}
        for t in body.tools or []] or None
    template = getattr(ctx.tokenizer, "chat_template", None) or ""
    reasoning = template_has_reasoning(template)
    chat = _chat_messages(body, reasoning)
    cont = chat[-1]["role"] == "assistant" and not chat[-1].get("tool_calls") \
        and bool(chat[-1].get("content"))
    switches = _template_kwargs(body.chat_template_kwargs)
    plan = ReasoningPlan()
    if reasoning:   # reasoning_effort: the template's switch, or a bound on the section
        # (the switch now; an effort's budget once max_tokens is known, below)
        off = body.reasoning_effort == "none"
        plan = plan_reasoning(template=template, thinking_type="disabled" if off else None,
                              budget_tokens=None, effort=None, max_tokens=0)
        if plan.switch is not None:
            switches.setdefault("enable_thinking", plan.switch)
    # A template without a tool section gets the tools described in its system turn, and
    # calls come back in the Hermes format (docs/api.md, "Tools on any template").
    generic = bool(tools) and not ctx.template_shows_tools
    parser_name = "hermes" if generic else ctx.parser_name   # the format the generic text asks for
    # Cheap rejections before rendering and tokenizing: the prompt's size, a full queue.
    ctx.check_prompt_bytes(_chat_text_bytes(chat), param="messages")
    ctx.check_capacity(tenant, 429)
    try:
        text = await ctx.off_loop(ctx.tokenizer.apply_chat_template,
                                  with_generic_tools(chat, tools) if generic else chat,
                                  tools=None if generic else tools,
                                  add_generation_prompt=not cont, continue_final_message=cont,
                                  **switches)
    except ChatTemplateError as exc:
        raise APIError(400, str(exc), param="messages") from None
    # response_format: compiled off the event loop (a cache hit for the engine afterwards);
    # a reply constrained to a schema is never parsed for tool calls
    structured_output = await ctx.off_loop(structured.from_openai, body, ctx.tokenizer)
    use_parser = mode != "none" and parser_name is not None and structured_output is None
    # Tool calls constrained by a grammar: a forced call, strict tools, the generic format,
    # or parallel_tool_calls: false (their arguments then stream as they are generated).
    parallel = body.parallel_tool_calls is not False
    if use_parser and not cont and (mode in ("named", "required") or generic or not parallel
                                    or any(t.function.strict for t in body.tools or [])):
        specs = [(t.function.name, t.function.parameters, bool(t.function.strict))
                 for t in body.tools or []]
        structured_output = await ctx.off_loop(
            structured.tool_constraint, ctx.tokenizer, specs, parser_name,
            choice="auto" if mode == "auto" else mode, name=name, parallel=parallel)
    ids = await ctx.off_loop(ctx.encode, text)
    if trace is not None:
        trace.mark_tokenized(len(ids))
    requested = body.max_completion_tokens or body.max_tokens
    k = (body.top_logprobs or 0) if body.logprobs else None
    # A reasoning template's reply reasons first: an effort level's budget closes the section
    # by grammar, and a constrained reply keeps its section in front (text/reasoning.py).
    constrained = structured_output is not None
    thinks = reasoning and not cont and not text.rstrip().endswith("</think>")
    budget = (effort_budget(body.reasoning_effort, ctx.effective_max_tokens(len(ids),
                                                                           requested)[0])
              if thinks and plan.budget is None and body.reasoning_effort != "none"
              else plan.budget)
    reasons_by_grammar = thinks and (budget is not None or constrained)
    if reasons_by_grammar:
        structured_output = await ctx.off_loop(structured.with_reasoning, ctx.tokenizer,
                                               structured_output, budget,
                                               inside=text.rstrip().endswith("<think>"),
                                               param="reasoning_effort")
    params, max_tokens, clamped = sampling_params(ctx, body, len(ids), requested,
                                                  structured_output, logprobs=k)
    cid = ctx.new_request_id("chatcmpl-")
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools or []}
    # one parser per choice: the format's calls (held to one where no grammar enforces it),
    # behind the splitter of a leading <think> section (it becomes reasoning_content)
    parser = functools.partial(
        reply_parser, parser_name if use_parser else None, stream_arguments=constrained,
        tools=schemas, one_call=not constrained and (not parallel
                                                     or mode in ("named", "required")),
        reasoning=reasoning and (not constrained or reasons_by_grammar),
        inside=text.rstrip().endswith("<think>"))
    n = body.n or 1
    gens = await start_choices(ctx, cid, [(ids, p) for p in choice_params(params, n)], tenant,
                              trace, parser, n=n)
    headers = max_tokens_headers(max_tokens, clamped, requested)
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        frames = chat_stream(ctx, gens, body.model, cid, created, include_usage, k)
        return StreamingResponse(with_keepalive(frames, ctx.options.ping_interval, OPENAI_KEEPALIVE),
                                 media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
    result = await collect_unless_disconnected(request, chat_collect(ctx, gens, body.model, cid,
                                                                     created, k))
    return JSONResponse(result, headers={**headers, **summed_cost_headers(gens)})


# chat_template_kwargs may not replace what the server itself passes to the template
_RESERVED_TEMPLATE_VARS = frozenset({"messages", "tools", "add_generation_prompt",
                                     "continue_final_message", "documents", "chat_template",
                                     "tokenize", "return_dict"})


def _template_kwargs(kwargs: dict | None) -> dict[str, Any]:
    """vLLM's ``chat_template_kwargs``: extra template variables (Qwen3's ``enable_thinking``),
    plain JSON values; 400 for one that would replace the server's own arguments."""
    if not kwargs:
        return {}
    bad = sorted(_RESERVED_TEMPLATE_VARS & set(kwargs))
    if bad:
        raise APIError(400, f"chat_template_kwargs may not set {', '.join(bad)}",
                       param="chat_template_kwargs")
    check_nesting(kwargs, "chat_template_kwargs")
    return dict(kwargs)
