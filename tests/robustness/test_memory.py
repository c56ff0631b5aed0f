"""Freed heap memory goes back to the OS (api/memory.py: glibc malloc_trim, periodically)."""
from __future__ import annotations

import asyncio
import sys
import time

import pytest

from tokenfactory.api.memory import find_malloc_trim, set_trim_threshold, trim_periodically
from tokenfactory.api.serve_cli import build_parser

HANG_GUARD_S = 30.0   # a hang guard, not a performance threshold


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_malloc_trim_and_mallopt_are_found_and_callable():
    trim = find_malloc_trim()
    assert trim is not None
    assert trim() in (0, 1)
    assert set_trim_threshold(4 << 20)


def test_trims_at_start_then_only_after_activity():
    calls: list[int] = []
    activity = {"n": 0}

    async def scenario():
        task = asyncio.ensure_future(trim_periodically(0.001, lambda: calls.append(1) or 1,
                                                       lambda: activity["n"]))

        async def until(n):
            deadline = time.monotonic() + HANG_GUARD_S
            while len(calls) < n:
                assert time.monotonic() < deadline, "hang guard"
                await asyncio.sleep(0.001)

        await until(1)                  # at start-up: what loading the model freed
        await asyncio.sleep(0.05)       # many intervals, nothing happened: left alone
        assert len(calls) == 1
        activity["n"] += 1              # a request came or went
        await until(2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(scenario())


def test_a_failing_trim_stops_trying_without_raising(caplog):
    def boom():
        raise OSError("no")

    async def scenario():
        await asyncio.wait_for(trim_periodically(0.001, boom), HANG_GUARD_S)
    asyncio.run(scenario())
    assert "malloc_trim failed" in caplog.text


def test_serve_flag():
    assert build_parser().parse_args([]).malloc_trim_interval == 1.0
    assert build_parser().parse_args(["--malloc-trim-interval", "0"]).malloc_trim_interval == 0


def test_prompt_work_runs_on_a_fixed_small_pool(tokenizer):
    """Template rendering + tokenizing: at most ``prompt_threads`` threads however many
    requests arrive at once (each such thread keeps a malloc arena and a BPE word cache)."""
    import threading

    from tokenfactory.api.metrics import Metrics
    from tokenfactory.api.serving import ServerOptions, ServingContext

    from .conftest import make_engine

    engine = make_engine(tokenizer, record_work=False)
    ctx = ServingContext(engine, tokenizer, ServerOptions(prompt_threads=2), Metrics(engine))

    def work(i):
        time.sleep(0.01)
        return threading.current_thread().name, len(tokenizer.encode(f"request {i}"))

    async def scenario():
        return await asyncio.gather(*[ctx.off_loop(work, i) for i in range(16)])
    try:
        results = asyncio.run(scenario())
    finally:
        ctx.close()
    names = {name for name, _ in results}
    assert 1 <= len(names) <= 2 and all(n.startswith("tokenfactory-prompt") for n in names)
    assert all(n > 0 for _, n in results)
