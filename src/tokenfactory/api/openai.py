"""OpenAI-compatible /v1/chat/completions and /v1/completions on the same engine.

There are no explicit breakpoints here; automatic prefix caching still applies and is reported
as ``usage.prompt_tokens_details.cached_tokens`` (a subset of ``prompt_tokens``).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import time
from typing import Any, AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request

from tokenfactory.api import structured
from tokenfactory.api.errors import APIError, openai_error_body
from tokenfactory.api.limits import check_nesting
from tokenfactory.api.openai_models import MAX_CHOICES, ChatCompletionRequest, CompletionRequest
from tokenfactory.api.serving import (Finished, Generation, GenerationFailed, ServingContext,
                                      cost_headers, Started, TextEvent, make_sampling_params)
from tokenfactory.api.sse import (OPENAI_KEEPALIVE, SSE_HEADERS, collect_unless_disconnected,
                                  openai_frame, with_keepalive)
from tokenfactory.api.trace import trace_of
from tokenfactory.text.chat_template import ChatTemplateError, with_generic_tools
from tokenfactory.text.grammar import compiler_for
from tokenfactory.text.reasoning import ReasoningPlan, effort_budget, plan_reasoning
from tokenfactory.text.tool_parser_base import FirstCallOnly
from tokenfactory.text.tool_parsers import (ReasoningParser, TextDelta, ThinkingDelta,
                                            ToolCallArgsDelta, ToolCallEnd, ToolCallStart,
                                            get_tool_parser, template_has_reasoning)

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
              structured_output=None, *, logprobs: int | None = None,
              prompt_logprobs: int | None = None):
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
        structured_output=structured_output, logit_bias=_logit_bias(body.logit_bias, vocab),
        logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    return make_sampling_params(**kw), max_tokens, clamped


def _logit_bias(bias: dict[str, float] | None, vocab: int | None) -> dict[int, float] | None:
    """OpenAI's ``{"token id": bias}`` (JSON keys are strings) as {id: bias}, ids checked
    against the vocabulary (bounds on the values: SamplingParams)."""
    if not bias:
        return None
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            tid = int(key)
        except ValueError:
            raise APIError(400, f"logit_bias keys must be token ids, got {key[:40]!r}",
                           param="logit_bias") from None
        if not 0 <= tid < (vocab or 2**31):
            raise APIError(400, f"logit_bias: token id {tid} is not in [0, {vocab})",
                           param="logit_bias")
        out[tid] = value
    return out


def _choice_seeds(seed: int | None, n: int) -> list[int | None]:
    """One seed per choice: choice i of a seeded request uses ``seed + i`` (kept in the 64-bit
    range), so each choice is reproducible and no two are the same sample."""
    if seed is None:
        return [None] * n
    return [seed] + [(seed + i + 2**63) % 2**64 - 2**63 for i in range(1, n)]


def _choice_params(params, n: int) -> list:
    return [params] + [dataclasses.replace(params, seed=s)
                       for s in _choice_seeds(params.seed, n)[1:]]


class _Tracked(Generation):
    """A Generation that remembers the engine output whose events it is yielding, so a
    stream can attach the log probabilities of exactly the tokens a chunk carries."""

    last_output = None

    def _take(self):
        out = super()._take()
        self.last_output = out
        return out

    async def prefilled(self) -> None:
        """Wait for the first engine output (the prompt is then in the KV cache and its full
        pages in the prefix cache) or the end of the request, without consuming anything."""
        while not self._pending and not self._pump_done:
            self._ready.clear()
            await self._ready.wait()


async def _start_all(ctx: ServingContext, cid: str, jobs: list[tuple[list[int], Any]],
                     tenant: str | None, trace, parser=None, *, n: int = 1) -> list[Generation]:
    """Submit one engine request per (prompt ids, params) job (each with its own tool parser);
    jobs come in groups of ``n`` choices of one prompt. If one cannot start, those already
    submitted are aborted.

    The n choices of a prompt share its KV pages: the engine's prefix cache only knows a
    page once it is computed, so choices admitted together would each prefill the prompt.
    The first choice of each prompt goes first; the others are submitted once its first
    output arrived (its prompt pages are then cached) and read those pages from cache."""
    slots: list[Generation | None] = [None] * len(jobs)

    async def submit(i: int) -> None:
        ids, params = jobs[i]
        slots[i] = _Tracked(ctx, cid if i == 0 else f"{cid}-{i}", ids, params,
                            cache_salt=tenant, breakpoints=[], overload_status=429,
                            trace=trace if i == 0 else None,
                            parser=parser() if parser is not None else None)
        await slots[i].start()

    share = n > 1 and ctx.prefix_caching
    try:
        for i in range(len(jobs)):
            if not share or i % n == 0:
                await submit(i)
        if share:
            await asyncio.gather(*(slots[i].prefilled() for i in range(0, len(jobs), n)
                                   if len(jobs[i][0]) >= ctx.block_size))
            for i in range(len(jobs)):
                if i % n:
                    await submit(i)
    except BaseException:
        for gen in slots:
            if gen is not None:
                await gen.close()
        raise
    gens: list[Generation] = slots   # type: ignore[assignment] - every slot is filled
    return gens


_DONE = object()


async def _merged(gens: list[Generation]) -> AsyncIterator[tuple[int, Any]]:
    """(choice index, event) from every generation as they arrive; one choice's failure ends
    the whole stream (the others are aborted)."""
    if len(gens) == 1:
        async for ev in gens[0].events():
            yield 0, ev
        return
    # bounded: a slow reader holds each choice back at its put, so the outputs pile up merged
    # in that choice's Generation (one pending output each), not as events here
    queue: asyncio.Queue = asyncio.Queue(maxsize=len(gens))

    async def run(i: int, gen: Generation) -> None:
        try:
            async for ev in gen.events():
                await queue.put((i, ev))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - re-raised by the consumer
            await queue.put((i, exc))
            return
        await queue.put((i, _DONE))

    tasks = [asyncio.ensure_future(run(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(gens)
        while remaining:
            i, ev = await queue.get()
            if ev is _DONE:
                remaining -= 1
            elif isinstance(ev, BaseException):
                raise ev
            else:
                yield i, ev
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t


# ------------------------------------------------------------------ log probabilities
def _token_bytes(ctx: ServingContext, token_id: int) -> bytes:
    """The exact bytes of one token (a piece of a multi-byte character stays a piece):
    llguidance's view of the tokenizer, which text/grammar.py builds once per tokenizer."""
    try:
        return compiler_for(ctx.tokenizer).ll_tokenizer.decode_bytes([token_id])
    except Exception:  # noqa: BLE001 - a tokenizer llguidance cannot read: its own decode
        return ctx.tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")


def _is_special(ctx: ServingContext, token_id: int) -> bool:
    try:
        return bool(compiler_for(ctx.tokenizer).ll_tokenizer.is_special_token(token_id))
    except Exception:  # noqa: BLE001 - as _token_bytes
        return False


def _token_str(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def _top(position: dict, k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely tokens of one position's {id: Logprob}, best first."""
    ranked = sorted(position.items(), key=lambda kv: -kv[1].logprob)
    return [(tid, lp.logprob) for tid, lp in ranked[:k]]


def _chat_logprobs(ctx: ServingContext, comp, start: int, end: int, k: int) -> list[dict]:
    """OpenAI chat ``logprobs.content`` entries for output positions [start, end)."""
    entries = []
    for pos in range(start, end):
        tid, position = comp.token_ids[pos], comp.logprobs[pos]
        raw = _token_bytes(ctx, tid)
        entries.append({"token": _token_str(raw), "logprob": position[tid].logprob,
                        "bytes": list(raw), "top_logprobs": [
                            {"token": _token_str(b), "logprob": lp, "bytes": list(b)}
                            for b, lp in ((_token_bytes(ctx, t), lp)
                                          for t, lp in _top(position, k))]})
    return entries


class _CompletionLogprobs:
    """The completions API's ``logprobs`` object (tokens, token_logprobs, top_logprobs,
    text_offset), built position by position; prompt positions first when echoing."""

    def __init__(self, ctx: ServingContext, k: int, offset: int = 0):
        self.ctx, self.k, self.offset = ctx, k, offset

    def build(self, token_ids: list[int], positions: list) -> dict:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                "text_offset": []}
        for tid, position in zip(token_ids, positions):
            tok = _token_str(_token_bytes(self.ctx, tid))
            out["tokens"].append(tok)
            out["text_offset"].append(self.offset)
            if not _is_special(self.ctx, tid):   # special tokens are not in the echoed text
                self.offset += len(tok)
            if position is None:   # the first prompt token: nothing before it to predict it
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(position[tid].logprob)
            out["top_logprobs"].append({_token_str(_token_bytes(self.ctx, t)): lp
                                        for t, lp in _top(position, self.k)})
        return out


def _usage(outs, n: int | None = None) -> dict:
    """One usage for all choices: each prompt counted once (with the cached tokens of its
    first choice), completion tokens summed (as OpenAI reports ``n`` > 1 and several
    prompts). ``outs`` come in groups of ``n`` choices per prompt (default: one prompt)."""
    outs = outs if isinstance(outs, list) else [outs]
    firsts = outs[::n or len(outs)]
    p = sum(len(o.prompt_token_ids) for o in firsts)
    c = sum(max(o.num_cached_tokens, 0) for o in firsts)
    done = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"prompt_tokens": p, "completion_tokens": done, "total_tokens": p + done,
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
    params, max_tokens, clamped = _sampling(ctx, body, len(ids), requested, structured_output,
                                            logprobs=k)
    cid = ctx.new_request_id("chatcmpl-")
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools or []}
    parser = (functools.partial(get_tool_parser(parser_name), stream_arguments=constrained,
                                tools=schemas)
              if use_parser else None)
    if parser is not None and not constrained and (not parallel or mode in ("named",
                                                                           "required")):
        # no grammar for this format: the parser enforces one call
        parser = functools.partial(_first_call_only, parser)
    if reasoning and (not constrained or reasons_by_grammar):
        # a reasoning template: a leading <think> section becomes reasoning_content
        parser = functools.partial(_reasoning_parser, parser, text.rstrip().endswith("<think>"))
    n = body.n or 1
    gens = await _start_all(ctx, cid, [(ids, p) for p in _choice_params(params, n)], tenant,
                            trace, parser, n=n)
    headers = _headers(max_tokens, clamped, requested)
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        frames = _chat_stream(ctx, gens, body.model, cid, created, include_usage, k)
        return StreamingResponse(with_keepalive(frames, ctx.options.ping_interval, OPENAI_KEEPALIVE),
                                 media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
    result = await collect_unless_disconnected(request, _chat_collect(ctx, gens, body.model, cid,
                                                                      created, k))
    return JSONResponse(result, headers={**headers, **_cost_headers(gens)})


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


def _first_call_only(inner) -> FirstCallOnly:
    return FirstCallOnly(inner())


def _reasoning_parser(inner, inside: bool) -> ReasoningParser:
    return ReasoningParser(inner() if inner is not None else None, inside=inside)


def _cost_headers(gens: list[Generation]) -> dict[str, str]:
    """The bill of all choices: each header's figures summed over the choices."""
    heads = [cost_headers(g) for g in gens]
    if len(heads) == 1 or not heads[0]:
        return heads[0]
    out = {}
    for name in heads[0]:
        try:
            out[name] = f"{sum(float(h[name]) for h in heads):.6g}"
        except (KeyError, ValueError):
            out[name] = heads[0][name]
    return out


class _ToolCallAccumulator:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx
        self.calls: list[dict] = []

    def feed(self, ev) -> dict | None:
        """A chat delta for this event (None when it adds nothing)."""
        if isinstance(ev, (TextEvent, TextDelta)):
            return {"content": ev.text} if ev.text else None
        if isinstance(ev, ThinkingDelta):   # vLLM's and DeepSeek's field for reasoning
            return {"reasoning_content": ev.text} if ev.text else None
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


async def _chat_collect(ctx, gens: list[Generation], model: str, cid: str, created: int,
                        k: int | None) -> dict:
    accs = [_ToolCallAccumulator(ctx) for _ in gens]
    texts: list[list[str]] = [[] for _ in gens]
    reasoning: list[list[str]] = [[] for _ in gens]
    finals: list[Any] = [None] * len(gens)
    try:
        async for i, ev in _merged(gens):
            if isinstance(ev, Finished):
                finals[i] = ev.output
            elif not isinstance(ev, Started):
                d = accs[i].feed(ev)
                if d and "content" in d:
                    texts[i].append(d["content"])
                elif d and "reasoning_content" in d:
                    reasoning[i].append(d["reasoning_content"])
    except GenerationFailed as exc:
        raise APIError(500, f"generation failed: {exc}") from None
    choices = []
    for i, (acc, final) in enumerate(zip(accs, finals)):
        message: dict[str, Any] = {"role": "assistant", "content": "".join(texts[i]) or None}
        if reasoning[i]:
            message["reasoning_content"] = "".join(reasoning[i])
        if acc.calls:
            message["tool_calls"] = acc.calls
        comp = final.outputs[0]
        logprobs = None
        if k is not None:
            logprobs = {"content": _chat_logprobs(ctx, comp, 0, len(comp.logprobs or ()), k),
                        "refusal": None}
        choices.append({"index": i, "message": message, "logprobs": logprobs,
                        "finish_reason": _finish_reason(final, len(acc.calls))})
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": _usage(finals)}


async def _chat_stream(ctx, gens: list[Generation], model: str, cid: str, created: int,
                       include_usage: bool, k: int | None) -> AsyncIterator[str]:
    accs = [_ToolCallAccumulator(ctx) for _ in gens]
    sent = [0] * len(gens)        # output positions whose logprobs went out, per choice
    finals: list[Any] = [None] * len(gens)

    def chunk(i: int, delta: dict, finish: str | None = None, out=None) -> str:
        logprobs = None
        if k is not None and out is not None:
            comp = out.outputs[0]
            end = len(comp.logprobs or ())
            logprobs = {"content": _chat_logprobs(ctx, comp, sent[i], end, k), "refusal": None}
            sent[i] = end
        return openai_frame({"id": cid, "object": "chat.completion.chunk", "created": created,
                             "model": model, "choices": [{"index": i, "delta": delta,
                                                          "logprobs": logprobs,
                                                          "finish_reason": finish}]})
    try:
        async for i, ev in _merged(gens):
            if isinstance(ev, Started):
                yield chunk(i, {"role": "assistant", "content": ""})
            elif isinstance(ev, Finished):
                finals[i] = ev.output
                yield chunk(i, {}, _finish_reason(ev.output, len(accs[i].calls)), ev.output)
                if include_usage and all(f is not None for f in finals):
                    yield openai_frame({"id": cid, "object": "chat.completion.chunk",
                                        "created": created, "model": model, "choices": [],
                                        "usage": _usage(finals)})
            else:
                d = accs[i].feed(ev)
                if d:
                    yield chunk(i, d, out=gens[i].last_output)
    except APIError as exc:
        yield openai_frame(openai_error_body(exc.status, exc.message))
    except GenerationFailed as exc:
        yield openai_frame(openai_error_body(500, f"generation failed: {exc}"))
    except Exception as exc:  # noqa: BLE001 - never a cut stream without an error event
        log.exception("stream %s failed", cid)
        yield openai_frame(openai_error_body(500, f"internal error: {type(exc).__name__}"))
    yield openai_frame("[DONE]")


# ------------------------------------------------------------------------ completions
def _prompt_list(prompt) -> list[str | list[int]]:
    """The completions API's ``prompt`` as a list of prompts: a string, a list of strings, a
    list of token ids (one prompt) or a list of token-id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], (str, list)):
        return list(prompt)
    return [prompt]


def _check_prompts(ctx: ServingContext, prompts: list[str | list[int]]) -> None:
    """Cheap rejections before tokenizing: each prompt's size (its bytes, or its token count
    when given as ids) and its ids in the vocabulary."""
    many = len(prompts) > 1
    for i, prompt in enumerate(prompts):
        where = f"prompt[{i}]" if many else "prompt"
        if isinstance(prompt, str):
            ctx.check_prompt_bytes(_utf8_len(prompt), param="prompt")
        elif not prompt:
            raise APIError(400, f"{where} is empty", param="prompt")
        elif len(prompt) >= ctx.context_limit:
            ctx.effective_max_tokens(len(prompt), 1)   # the "prompt is too long" 400
    vocab = getattr(ctx.tokenizer, "vocab_size", None)
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, list) and vocab and any(not 0 <= t < vocab for t in prompt):
            where = f"prompt[{i}]" if many else "prompt"
            raise APIError(400, f"{where}: token ids must be in [0, {vocab})", param="prompt")


async def _prompt_ids(ctx: ServingContext, prompts: list[str | list[int]]) -> list[list[int]]:
    """Each prompt's token ids, strings tokenized off the event loop in one go."""
    many = len(prompts) > 1
    texts = [p for p in prompts if isinstance(p, str)]
    encoded = iter(await ctx.off_loop(
        lambda: [ctx.encode(t, add_special_tokens=True) for t in texts]) if texts else [])
    out = [next(encoded) if isinstance(p, str) else list(p) for p in prompts]
    for i, ids in enumerate(out):
        if not ids:
            raise APIError(400, f"prompt[{i}] is empty" if many else "the prompt is empty",
                           param="prompt")
    return out


async def create_completion(ctx: ServingContext, request: Request, body: CompletionRequest,
                            tenant: str | None):
    """Several prompts give ``n`` choices each, numbered ``prompt_index * n + j`` (as OpenAI
    and vLLM number them); usage is summed over the prompts."""
    trace = trace_of(request)   # None unless tracing is installed (api/trace.py)
    ctx.resolve_model(body.model)
    prompts = _prompt_list(body.prompt)
    n = body.n or 1
    if len(prompts) * n > MAX_CHOICES:
        raise APIError(400, f"{len(prompts)} prompts x n={n} is more than {MAX_CHOICES} "
                            "choices per request", param="prompt")
    _check_prompts(ctx, prompts)
    ctx.check_capacity(tenant, 429)
    all_ids = await _prompt_ids(ctx, prompts)
    if trace is not None:
        trace.mark_tokenized(sum(map(len, all_ids)))
    requested = body.max_tokens or 16   # the completions API's documented default
    k = body.logprobs
    jobs, limits = [], []
    for ids in all_ids:
        params, max_tokens, clamped = _sampling(ctx, body, len(ids), requested, logprobs=k,
                                                prompt_logprobs=k if body.echo else None)
        jobs += [(ids, p) for p in _choice_params(params, n)]
        limits.append((max_tokens, clamped))
    cid = ctx.new_request_id("cmpl-")
    gens = await _start_all(ctx, cid, jobs, tenant, trace, n=n)
    headers = _headers(min(m for m, _ in limits), any(c for _, c in limits), requested)
    created = int(time.time())
    echoes = [((p if isinstance(p, str) else ctx.tokenizer.decode(ids)) if body.echo else "")
              for p, ids in zip(prompts, all_ids) for _ in range(n)]   # one per choice
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        frames = _completion_stream(ctx, gens, body.model, cid, created, echoes, include_usage,
                                    k, n)
        return StreamingResponse(with_keepalive(frames, ctx.options.ping_interval, OPENAI_KEEPALIVE),
                                 media_type="text/event-stream", headers={**SSE_HEADERS, **headers})

    async def collect():
        parts: list[list[str]] = [[echo] for echo in echoes]
        finals: list[Any] = [None] * len(gens)
        try:
            async for i, ev in _merged(gens):
                if isinstance(ev, TextEvent):
                    parts[i].append(ev.text)
                elif isinstance(ev, Finished):
                    finals[i] = ev.output
        except GenerationFailed as exc:
            raise APIError(500, f"generation failed: {exc}") from None
        choices = []
        for i, final in enumerate(finals):
            logprobs = None
            if k is not None:
                lp = _CompletionLogprobs(ctx, k)
                logprobs = _join_logprobs(
                    lp.build(final.prompt_token_ids, final.prompt_logprobs or [])
                    if body.echo else None,
                    lp.build(final.outputs[0].token_ids, final.outputs[0].logprobs or []))
            choices.append({"index": i, "text": "".join(parts[i]), "logprobs": logprobs,
                            "finish_reason": _finish_reason(final, 0)})
        return {"id": cid, "object": "text_completion", "created": created, "model": body.model,
                "choices": choices, "usage": _usage(finals, n)}

    result = await collect_unless_disconnected(request, collect())
    return JSONResponse(result, headers={**headers, **_cost_headers(gens)})


def _join_logprobs(a: dict | None, b: dict) -> dict:
    return b if a is None else {key: a[key] + b[key] for key in b}


async def _completion_stream(ctx, gens: list[Generation], model: str, cid: str, created: int,
                             echoes: list[str], include_usage: bool, k: int | None,
                             n: int) -> AsyncIterator[str]:
    lps = [_CompletionLogprobs(ctx, k) if k is not None else None for _ in gens]
    sent = [0] * len(gens)
    finals: list[Any] = [None] * len(gens)

    def chunk(i: int, text: str, finish: str | None = None, out=None,
              prompt: bool = False) -> str:
        logprobs = None
        if lps[i] is not None and out is not None:
            if prompt:
                logprobs = lps[i].build(out.prompt_token_ids, out.prompt_logprobs or [])
            else:
                comp = out.outputs[0]
                end = len(comp.logprobs or ())
                logprobs = lps[i].build(comp.token_ids[sent[i]:end], comp.logprobs[sent[i]:end])
                sent[i] = end
        return openai_frame({"id": cid, "object": "text_completion", "created": created,
                             "model": model, "choices": [{"index": i, "text": text,
                                                          "logprobs": logprobs,
                                                          "finish_reason": finish}]})
    try:
        async for i, ev in _merged(gens):
            if isinstance(ev, Started) and echoes[i]:
                yield chunk(i, echoes[i], out=ev.output, prompt=True)
            elif isinstance(ev, TextEvent):
                yield chunk(i, ev.text, out=gens[i].last_output)
            elif isinstance(ev, Finished):
                finals[i] = ev.output
                yield chunk(i, "", _finish_reason(ev.output, 0), ev.output)
                if include_usage and all(f is not None for f in finals):
                    yield openai_frame({"id": cid, "object": "text_completion",
                                        "created": created, "model": model, "choices": [],
                                        "usage": _usage(finals, n)})
    except APIError as exc:
        yield openai_frame(openai_error_body(exc.status, exc.message))
    except GenerationFailed as exc:
        yield openai_frame(openai_error_body(500, f"generation failed: {exc}"))
    except Exception as exc:  # noqa: BLE001 - never a cut stream without an error event
        log.exception("stream %s failed", cid)
        yield openai_frame(openai_error_body(500, f"internal error: {type(exc).__name__}"))
    yield openai_frame("[DONE]")
