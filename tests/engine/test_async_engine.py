"""AsyncEngine: the engine thread, per-request streams, abort on cancel, overload, death."""
from __future__ import annotations

import asyncio

import pytest

from tokenfactory.engine.async_engine import AsyncEngine, EngineDeadError, EngineOverloadedError
from tokenfactory.engine.core import EngineConfig, EngineCore
from tokenfactory.engine.executor import ScriptedExecutor
from tokenfactory.engine.sampling_params import SamplingParams
from tokenfactory.engine.scheduler import AdmissionError

EOS = 0


def make_engine(script=lambda r: [5, 6, 7, EOS], **kw) -> AsyncEngine:
    core = EngineCore(ScriptedExecutor(script, EOS), EngineConfig(num_kv_blocks=64, max_model_len=512),
                      model_max_len=512, eos_token_ids=[EOS])
    eng = AsyncEngine(core, **kw)
    eng.start()
    return eng


async def collect(eng, rid, prompt, params):
    return [o async for o in eng.generate(rid, prompt, params)]


def test_streams_interleave_and_finish():
    eng = make_engine()

    async def main():
        return await asyncio.gather(*(collect(eng, f"r{i}", [1, 2, i + 3], SamplingParams(max_tokens=8))
                                      for i in range(8)))
    try:
        results = asyncio.run(main())
    finally:
        eng.shutdown()
    for outs in results:
        # one output per step, or fewer when outputs waited for the loop (merged deltas)
        assert [t for o in outs for t in o.outputs[0].new_token_ids] == [5, 6, 7, EOS]
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "stop"
    assert eng.core.num_free_blocks() == eng.core.kv.num_blocks


def test_cancelled_consumer_aborts_and_frees_pages():
    eng = make_engine(script=lambda r: [5] * 10_000)

    async def main():
        agen = eng.generate("long", [1, 2, 3], SamplingParams(max_tokens=400, ignore_eos=True))
        got = 0
        async for _ in agen:
            got += 1
            if got == 3:
                break
        await agen.aclose()
        for _ in range(200):
            if not eng.core.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
    try:
        asyncio.run(main())
        assert not eng.core.has_unfinished_requests()
        assert eng.core.num_free_blocks() == eng.core.kv.num_blocks
    finally:
        eng.shutdown()


def test_admission_error_is_raised_before_any_output():
    eng = make_engine()

    async def main():
        with pytest.raises(AdmissionError, match="context length"):
            await collect(eng, "big", list(range(500)), SamplingParams(max_tokens=100))
    try:
        asyncio.run(main())
    finally:
        eng.shutdown()
    assert eng.num_in_flight() == 0


def test_overload_rejects_at_once_when_queue_is_full():
    eng = AsyncEngine(EngineCore(ScriptedExecutor(lambda r: [5], EOS), EngineConfig(num_kv_blocks=8),
                                 model_max_len=64, eos_token_ids=[EOS]), max_queued_requests=2)
    # Not started: submitted requests stay queued, so the third is refused.

    async def main():
        gens = [eng.generate(f"q{i}", [1, 2], SamplingParams(max_tokens=2)) for i in range(2)]
        tasks = [asyncio.ensure_future(g.__anext__()) for g in gens]
        await asyncio.sleep(0.01)
        with pytest.raises(EngineOverloadedError):
            await eng.generate("q3", [1, 2], SamplingParams(max_tokens=2)).__anext__()
        for t in tasks:
            t.cancel()
    asyncio.run(main())


def test_engine_death_fails_in_flight_requests():
    eng = make_engine(script=lambda r: [5] * 100)

    def explode():
        raise SystemError("engine loop bug")
    eng.core.scheduler.schedule = explode  # a bug outside the forward pass kills the loop

    async def main():
        with pytest.raises(EngineDeadError):
            await collect(eng, "x", [1, 2, 3], SamplingParams(max_tokens=5))
    try:
        asyncio.run(main())
    finally:
        eng.shutdown()
    assert not eng.is_alive


def test_outputs_waiting_for_a_busy_event_loop_are_merged():
    """While the consumer's event loop is busy (a slow client, a blocking handler), the engine
    keeps at most one pending output per request, its deltas merged: nothing is lost and the
    backlog does not grow with the number of steps."""
    eng = make_engine(script=lambda r: list(range(10, 110)))   # 100 tokens, no EOS
    import time

    async def main():
        gen = eng.generate("slow", [1, 2, 3], SamplingParams(max_tokens=100))
        first = await gen.__anext__()
        while eng.core.has_unfinished_requests():   # block the loop: no hand-over can run
            time.sleep(0.005)
        return [first] + [o async for o in gen]
    try:
        outs = asyncio.run(main())
    finally:
        eng.shutdown()
    delivered = [t for o in outs for t in o.outputs[0].new_token_ids]
    assert delivered == list(range(10, 110))                  # every token, once, in order
    assert outs[-1].finished and outs[-1].outputs[0].token_ids == delivered
    assert len(outs) <= 3     # the first output, at most one merged backlog, nothing per step
    assert eng.core.num_free_blocks() == eng.core.kv.num_blocks
