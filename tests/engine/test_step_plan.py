"""The step plan/result seam: plain data that crosses a process boundary, executor-side state
kept in step with the plans, and fault injection as an executor wrapper."""
from __future__ import annotations

import multiprocessing
import pickle

import pytest

from tokenfactory.engine.core import EngineConfig, EngineCore
from tokenfactory.engine.executor import ExecutorDeadError, ScriptedExecutor
from tokenfactory.engine.faults import FaultyExecutor
from tokenfactory.engine.request import Request
from tokenfactory.engine.sampling_params import SamplingParams
from tokenfactory.engine.step import StepPlan

EOS = 0


def script(view) -> list[int]:
    """Module level, so a ScriptedExecutor pickles into a worker process: echo the prompt
    reversed, then a token derived from the request id."""
    return view.prompt_token_ids[::-1] + [100 + len(view.request_id)]


def _worker(conn) -> None:
    """A remote executor: receives pickled plans, returns pickled results."""
    ex = ScriptedExecutor(script, EOS)
    ex.initialize_cache(64, 4)
    while True:
        plan = conn.recv()
        if plan is None:
            break
        conn.send(ex.execute(plan))
    conn.send(sorted(r for r in ("a", "bb", "ccc") if ex.states.get(r) is not None))


class ProcessExecutor:
    """Runs every plan in a child process through a pipe (pickling both ways)."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child,), daemon=True)
        self.proc.start()
        self.plans: list[StepPlan] = []

    def kv_cache_bytes_per_block(self, block_size: int) -> int:
        return 4096

    def initialize_cache(self, num_blocks: int, block_size: int) -> None:
        pass

    def execute(self, plan: StepPlan):
        self.plans.append(plan)
        self.conn.send(plan)
        return self.conn.recv()

    def close(self) -> list[str]:
        self.conn.send(None)
        known = self.conn.recv()
        self.proc.join(30)
        return known


def run_all(core: EngineCore) -> dict:
    finished = {}
    for _ in range(1000):
        if not core.has_unfinished_requests():
            break
        for out in core.step():
            if out.finished:
                finished[out.request_id] = out
    assert not core.has_unfinished_requests()
    return finished


def make_core(executor, **cfg) -> EngineCore:
    return EngineCore(executor, EngineConfig(num_kv_blocks=cfg.pop("num_kv_blocks", 64),
                                             block_size=4, **cfg),
                      model_max_len=256, eos_token_ids=[EOS])


def test_plans_cross_a_process_boundary_and_match_in_process():
    prompts = {"a": [5, 6, 7, 8, 9, 10, 11], "bb": [12, 13], "ccc": list(range(20, 37))}
    params = SamplingParams(max_tokens=30)

    def outputs(executor) -> dict:
        core = make_core(executor, max_num_batched_tokens=8)   # chunked prefill too
        for rid, p in prompts.items():
            core.add_request(rid, p, params)
        return {rid: o.outputs[0].token_ids for rid, o in run_all(core).items()}

    remote = ProcessExecutor()
    try:
        got = outputs(remote)
    finally:
        known = remote.close()
    want = outputs(ScriptedExecutor(script, EOS))
    assert got == want == {rid: p[::-1] + [100 + len(rid), EOS] for rid, p in prompts.items()}
    # the worker dropped every finished request's state (ids sent with later plans), except
    # those finishing in the very last step, whose ids had no later plan to travel with
    assert set(known) <= {rid for rid in prompts if rid in remote.plans[-1].finished_ids
                          or any(r.request_id == rid for r in remote.plans[-1].requests)}
    # prompts travel once: on admission; later steps carry only new tokens
    sent = [r for plan in remote.plans for r in plan.requests]
    assert sum(r.new is not None for r in sent) == len(prompts)
    assert all(len(r.token_ids) == 1 for r in sent if r.new is None and r.start >= 17)
    # a plan holds no engine object
    blob = pickle.dumps(remote.plans[0])
    assert b"Request\n" not in blob and b"tokenfactory.engine.request" not in blob


def test_preempted_request_resends_its_state():
    """A preempted request is recomputed from prompt + outputs: the executor gets both again
    and its outputs continue where they stopped."""
    seen: list[StepPlan] = []

    class Recording(ScriptedExecutor):
        def execute(self, plan):
            seen.append(plan)
            return super().execute(plan)

    core = make_core(Recording(lambda v: list(range(40, 60)), EOS), num_kv_blocks=9)
    params = SamplingParams(max_tokens=14, ignore_eos=True)
    for rid in ("x", "y"):
        core.add_request(rid, [1, 2, 3, 4, 5, 6], params)
    out = run_all(core)
    assert any(o.metrics.num_preemptions for o in out.values())
    assert all(o.outputs[0].token_ids == list(range(40, 54)) for o in out.values())
    resent = [r for p in seen for r in p.requests if r.new is not None and r.output_index > 0]
    assert resent and all(r.new.output_token_ids == list(range(40, 40 + r.output_index))
                          for r in resent)


def test_faulty_executor_delays_then_kills_the_engine():
    sleeps = []
    inner = ScriptedExecutor(lambda v: [7] * 50, EOS)
    faulty = FaultyExecutor(inner, die_after_steps=3, step_delay=0.25, sleep=sleeps.append)
    core = make_core(faulty)
    core.add_request("r", [1, 2, 3], SamplingParams(max_tokens=10, ignore_eos=True))
    outs = [core.step() for _ in range(3)]
    assert [len(o[0].outputs[0].token_ids) for o in outs] == [1, 2, 3]
    assert sleeps == [0.25] * 3 and inner.num_steps == 3
    with pytest.raises(ExecutorDeadError, match="after 3 steps"):
        core.step()   # escapes the engine's per-request isolation: the engine is dead
    assert inner.num_steps == 3


def test_faulty_executor_passes_through_and_refuses_bad_settings():
    inner = ScriptedExecutor(lambda v: [7, 8], EOS, bytes_per_block=1234)
    faulty = FaultyExecutor(inner)
    assert faulty.kv_cache_bytes_per_block(16) == 1234 and faulty.fallback_token == EOS
    core = make_core(faulty)
    core.add_request("r", [1, 2, 3], SamplingParams(max_tokens=5))
    assert run_all(core)["r"].outputs[0].token_ids == [7, 8, EOS]
    with pytest.raises(ValueError):
        FaultyExecutor(inner, die_after_steps=-1)
    with pytest.raises(ValueError):
        FaultyExecutor(inner, step_delay=-0.1)


def test_batch_to_plan_describes_live_requests():
    from tokenfactory.engine.executor import Batch, ScheduledChunk
    req = Request("q", [1, 2, 3, 4], SamplingParams())
    req.output_token_ids = [9]
    req.block_ids = [3, 5]
    plan = Batch([ScheduledChunk(req, 2, 3, True)], 4).to_plan()
    (s,) = plan.requests
    assert (s.token_ids, s.start, s.end, s.block_ids, s.output_index) == ([3, 4, 9], 2, 5,
                                                                          [3, 5], 1)
    assert s.new.prompt_token_ids == [1, 2, 3, 4] and s.new.output_token_ids == [9]
