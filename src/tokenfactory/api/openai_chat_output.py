"""A chat completion's reply out of its choices' events: text, ``reasoning_content`` and
tool-call deltas, as one ``chat.completion`` object or as ``chat.completion.chunk`` SSE frames
(with the log probabilities of exactly the tokens each chunk carries)."""
from __future__ import annotations

import json
from typing import Any, AsyncIterator

from tokenfactory.api.errors import APIError
from tokenfactory.api.openai_choices import (ended_stream, finish_reason, merged_events,
                                             usage_of)
from tokenfactory.api.openai_logprobs import chat_logprobs
from tokenfactory.api.serving import (Finished, Generation, GenerationFailed, ServingContext,
                                      Started, TextEvent)
from tokenfactory.api.sse import openai_frame
from tokenfactory.text.reasoning_parser import ThinkingDelta
from tokenfactory.text.tool_parser_base import (TextDelta, ToolCallArgsDelta, ToolCallEnd,
                                               ToolCallStart)



class ToolCallAccumulator:
    """One choice's events as chat deltas, keeping its tool calls (ids, names, arguments)."""

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


async def chat_collect(ctx, gens: list[Generation], model: str, cid: str, created: int,
                       k: int | None) -> dict:
    """The whole ``chat.completion`` object once every choice finished."""
    accs = [ToolCallAccumulator(ctx) for _ in gens]
    texts: list[list[str]] = [[] for _ in gens]
    reasoning: list[list[str]] = [[] for _ in gens]
    finals: list[Any] = [None] * len(gens)
    try:
        async for i, ev in merged_events(gens):
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
            logprobs = {"content": chat_logprobs(ctx, comp, 0, len(comp.logprobs or ()), k),
                        "refusal": None}
        choices.append({"index": i, "message": message, "logprobs": logprobs,
                        "finish_reason": finish_reason(final, len(acc.calls))})
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage_of(finals)}


def chat_stream(ctx, gens: list[Generation], model: str, cid: str, created: int,
                include_usage: bool, k: int | None) -> AsyncIterator[str]:
    """``chat.completion.chunk`` frames as the choices' events arrive, then ``[DONE]``; a
    failure ends the stream with an error frame, never a cut connection."""
    return ended_stream(_chat_chunks(ctx, gens, model, cid, created, include_usage, k), cid)


async def _chat_chunks(ctx, gens: list[Generation], model: str, cid: str, created: int,
                       include_usage: bool, k: int | None) -> AsyncIterator[str]:
    accs = [ToolCallAccumulator(ctx) for _ in gens]
    sent = [0] * len(gens)        # output positions whose logprobs went out, per choice
    finals: list[Any] = [None] * len(gens)

    def chunk(i: int, delta: dict, finish: str | None = None, out=None) -> str:
        logprobs = None
        if k is not None and out is not None:
            comp = out.outputs[0]
            end = len(comp.logprobs or ())
            logprobs = {"content": chat_logprobs(ctx, comp, sent[i], end, k), "refusal": None}
            sent[i] = end
        return openai_frame({"id": cid, "object": "chat.completion.chunk", "created": created,
                             "model": model, "choices": [{"index": i, "delta": delta,
                                                          "logprobs": logprobs,
                                                          "finish_reason": finish}]})
    async for i, ev in merged_events(gens):
        if isinstance(ev, Started):
            yield chunk(i, {"role": "assistant", "content": ""})
        elif isinstance(ev, Finished):
            finals[i] = ev.output
            yield chunk(i, {}, finish_reason(ev.output, len(accs[i].calls)), ev.output)
            if include_usage and all(f is not None for f in finals):
                yield openai_frame({"id": cid, "object": "chat.completion.chunk",
                                    "created": created, "model": model, "choices": [],
                                    "usage": usage_of(finals)})
        else:
            d = accs[i].feed(ev)
            if d:
                yield chunk(i, d, out=gens[i].last_output)
