"""A client slower than the engine: what piles up between them is bounded.

The engine thread emits one RequestOutput per step, each a snapshot with the request's whole
token list and text so far. The HTTP layer (api/serving.py ``Generation``) drains them as they
arrive and keeps at most one undelivered output per request, merging the deltas, so a stalled
client costs O(1) outputs instead of O(n) snapshots of O(n) each (the long soak's RSS step).
"""
from __future__ import annotations

import asyncio
import time

from tokenfactory.api.metrics import Metrics
from tokenfactory.api.serving import (Finished, Generation, ServerOptions, ServingContext,
                                      Started, TextEvent)
from tokenfactory.engine.sampling_params import SamplingParams

from .conftest import make_engine

HANG_GUARD_S = 30.0   # a hang guard, not a performance threshold


def _run(tokenizer, scenario) -> None:
    engine = make_engine(tokenizer, record_work=False)
    engine.start()
    try:
        ctx = ServingContext(engine, tokenizer, ServerOptions(served_model_name="tf-test"),
                             Metrics(engine))
        asyncio.run(scenario(engine, ctx))
    finally:
        engine.shutdown()


async def _wait_until(cond) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not cond():
        assert time.monotonic() < deadline, "hang guard"
        await asyncio.sleep(0.01)


def test_stalled_consumer_gets_one_merged_output(tokenizer):
    async def scenario(engine, ctx):
        ids = tokenizer.encode("request 1 [[reply:long]]")
        gen = Generation(ctx, "msg_stalled", ids, SamplingParams(max_tokens=200),
                         cache_salt=None, breakpoints=[])
        await gen.start()
        # the client reads nothing until the engine has finished the whole answer: by then
        # the engine's stream has been drained (generate() returned) into one pending output
        await _wait_until(lambda: engine.num_in_flight() == 0)
        events = [ev async for ev in gen.events()]
        assert [type(ev) for ev in events] == [Started, TextEvent, Finished]
        final = events[-1].output
        comp = final.outputs[0]
        assert final.finished and comp.finish_reason == "length"
        assert len(comp.token_ids) == 200 and len(comp.new_token_ids) == 200
        assert events[1].text == comp.text and comp.text.startswith("word0 word1")
        assert engine.core.num_free_blocks() == engine.core.kv.num_blocks
        assert ctx.ledger.num_open() == 0
    _run(tokenizer, scenario)


def test_client_leaving_while_outputs_pend_aborts_the_request(tokenizer):
    async def scenario(engine, ctx):
        ids = tokenizer.encode("request 2 [[slow]] [[reply:long]]")   # 80 ms per step
        gen = Generation(ctx, "msg_leaving", ids, SamplingParams(max_tokens=300),
                         cache_salt=None, breakpoints=[])
        await gen.start()
        events = gen.events()
        assert isinstance(await events.__anext__(), Started)
        await events.aclose()   # the client goes away mid-stream
        await _wait_until(lambda: engine.num_in_flight() == 0
                          and not engine.core.has_unfinished_requests())
        assert engine.core.num_free_blocks() == engine.core.kv.num_blocks
        assert ctx.ledger.num_open() == 0
    _run(tokenizer, scenario)
