"""EngineCore behaviour with a scripted executor: scheduling and KV page accounting, no model."""
from __future__ import annotations

import pytest

from tokenfactory.engine.core import EngineConfig, EngineCore
from tokenfactory.engine.executor import ScriptedExecutor
from tokenfactory.engine.request import CacheBreakpoint
from tokenfactory.engine.sampling_params import SamplingParams
from tokenfactory.engine.scheduler import AdmissionError

EOS = 0


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make_core(num_blocks=64, block_size=16, script=None, clock=None, **cfg) -> EngineCore:
    script = script or (lambda req: [7, 8, 9, 10, 11, 12, 13, 14])
    return EngineCore(ScriptedExecutor(script, fallback_token=EOS),
                      EngineConfig(num_kv_blocks=num_blocks, block_size=block_size, **cfg),
                      model_max_len=4096, eos_token_ids=[EOS], clock=clock or FakeClock())


def run_all(core: EngineCore) -> dict:
    finished = {}
    for _ in range(10_000):
        if not core.has_unfinished_requests():
            break
        for out in core.step():
            if out.finished:
                finished[out.request_id] = out
    assert not core.has_unfinished_requests()
    return finished


def test_generates_script_then_stops_on_eos_and_frees_pages():
    core = make_core(script=lambda r: [5, 6, EOS])
    core.add_request("a", list(range(1, 40)), SamplingParams(max_tokens=10))
    out = run_all(core)["a"]
    assert out.outputs[0].token_ids == [5, 6, EOS]
    assert out.outputs[0].finish_reason == "stop"
    assert core.num_free_blocks() == core.kv.num_blocks


def test_max_tokens_gives_length_and_ignore_eos_continues():
    core = make_core(script=lambda r: [EOS] * 20)
    core.add_request("a", [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True))
    core.add_request("b", [1, 2, 3], SamplingParams(max_tokens=5))
    core.add_request("c", [1, 2, 3], SamplingParams(max_tokens=5, min_tokens=3))
    outs = run_all(core)
    assert outs["a"].outputs[0].token_ids == [EOS] * 5 and outs["a"].outputs[0].finish_reason == "length"
    assert outs["b"].outputs[0].token_ids == [EOS] and outs["b"].outputs[0].finish_reason == "stop"
    # min_tokens: EOS does not end the request before 3 tokens (the real sampler also masks it).
    assert len(outs["c"].outputs[0].token_ids) == 3


def test_stop_token_ids_reports_stop_reason():
    core = make_core(script=lambda r: [5, 6, 42, 7])
    core.add_request("a", [1, 2, 3], SamplingParams(max_tokens=10, stop_token_ids=[42]))
    out = run_all(core)["a"].outputs[0]
    assert out.token_ids == [5, 6, 42] and out.finish_reason == "stop" and out.stop_reason == 42


def test_shared_100_token_prefix_reports_96_cached_tokens():
    core = make_core()
    shared = list(range(1000, 1100))
    core.add_request("first", shared + [1, 2, 3], SamplingParams(max_tokens=4))
    first = run_all(core)["first"]
    assert first.num_cached_tokens == 0
    core.add_request("second", shared + [4, 5, 6, 7], SamplingParams(max_tokens=4))
    second = run_all(core)["second"]
    assert second.num_cached_tokens == 96  # 6 full blocks of 16 out of the 100 shared tokens
    assert core.num_free_blocks() == core.kv.num_blocks
    stats = core.kv.pool.stats()
    assert stats.prefix_hits == 96


def test_identical_prompt_recomputes_last_token():
    core = make_core()
    prompt = list(range(1, 33))  # exactly two blocks
    for rid in ("a", "b"):
        core.add_request(rid, prompt, SamplingParams(max_tokens=2))
        out = run_all(core)[rid]
    # the last prompt token's block cannot be reused or there would be no logits to sample from
    assert out.num_cached_tokens == 16


def test_tenant_salt_isolates_prefix_cache():
    core = make_core()
    prompt = list(range(1, 70))
    core.add_request("a", prompt, SamplingParams(max_tokens=2), cache_salt="tenant-a")
    run_all(core)
    core.add_request("b", prompt, SamplingParams(max_tokens=2), cache_salt="tenant-b")
    assert run_all(core)["b"].num_cached_tokens == 0
    core.add_request("a2", prompt, SamplingParams(max_tokens=2), cache_salt="tenant-a")
    assert run_all(core)["a2"].num_cached_tokens == 64


def test_abort_frees_pages_immediately():
    core = make_core(script=lambda r: [5] * 100)
    core.add_request("a", list(range(1, 50)), SamplingParams(max_tokens=50))
    core.step()
    core.step()
    assert core.num_free_blocks() < core.kv.num_blocks
    assert core.abort("a")
    assert core.num_free_blocks() == core.kv.num_blocks
    outs = core.step()
    assert [o.outputs[0].finish_reason for o in outs] == ["abort"]
    assert not core.has_unfinished_requests()
    assert not core.abort("a")


def test_admission_rejects_what_can_never_fit():
    core = make_core(num_blocks=8, max_model_len=200)
    with pytest.raises(AdmissionError, match="exceeds the model's context length of 200"):
        core.add_request("a", list(range(150)), SamplingParams(max_tokens=100))
    with pytest.raises(AdmissionError, match="KV pages"):
        core.add_request("b", list(range(100)), SamplingParams(max_tokens=90))
    with pytest.raises(AdmissionError, match="empty"):
        core.add_request("c", [], SamplingParams(max_tokens=1))
    assert not core.has_unfinished_requests()


def test_chunked_prefill_shares_steps_with_decodes():
    core = make_core(script=lambda r: [5] * 100, max_num_batched_tokens=32)
    core.add_request("short", [1, 2, 3], SamplingParams(max_tokens=20, ignore_eos=True))
    core.step()
    core.add_request("long", list(range(1, 200)), SamplingParams(max_tokens=2))
    steps_with_both = 0
    for _ in range(10):
        outs = core.step()
        ids = {o.request_id for o in outs}
        if "short" in ids and core.scheduler.requests.get("long") is not None:
            steps_with_both += 1
    assert steps_with_both >= 5  # decodes kept flowing while the long prompt prefilled in chunks
    run_all(core)
    assert core.num_free_blocks() == core.kv.num_blocks


def test_preemption_when_pages_run_out_then_everything_completes():
    # 12 pages of 4 tokens; two requests that each grow to 40 tokens cannot both stay resident.
    core = make_core(num_blocks=12, block_size=4, script=lambda r: [5] * 30)
    core.add_request("a", list(range(1, 11)), SamplingParams(max_tokens=30, ignore_eos=True))
    core.add_request("b", list(range(11, 21)), SamplingParams(max_tokens=30, ignore_eos=True))
    outs = run_all(core)
    assert {len(o.outputs[0].token_ids) for o in outs.values()} == {30}
    assert sum(o.metrics.num_preemptions for o in outs.values()) >= 1
    assert core.num_free_blocks() == core.kv.num_blocks


def test_max_num_seqs_caps_running_batch():
    core = make_core(script=lambda r: [5] * 10, max_num_seqs=2)
    for i in range(5):
        core.add_request(f"r{i}", [1, 2, 3, i + 10], SamplingParams(max_tokens=3, ignore_eos=True))
    finished = set()
    while core.has_unfinished_requests():
        finished |= {o.request_id for o in core.step() if o.finished}
        assert core.num_running <= 2
    assert finished == {f"r{i}" for i in range(5)}


def test_failed_forward_pass_fails_only_that_batch_and_frees_pages():
    calls = {"n": 0}

    class Flaky(ScriptedExecutor):
        def execute(self, batch):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("boom")
            return super().execute(batch)

    core = EngineCore(Flaky(lambda r: [5] * 10, EOS), EngineConfig(num_kv_blocks=32),
                      model_max_len=4096, eos_token_ids=[EOS], clock=FakeClock())
    core.add_request("a", [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True))
    outs = run_all(core)
    assert outs["a"].outputs[0].finish_reason == "error" and "boom" in outs["a"].error
    assert core.num_free_blocks() == core.kv.num_blocks
    core.add_request("b", [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True))
    assert run_all(core)["b"].outputs[0].finish_reason == "length"


def test_pinned_prefix_survives_pressure_until_ttl_expires():
    clock = FakeClock()
    core = make_core(num_blocks=16, block_size=4, clock=clock, script=lambda r: [EOS])
    system = list(range(100, 124))  # 6 blocks
    core.add_request("pinned", system + [1], SamplingParams(max_tokens=1),
                     cache_breakpoints=[CacheBreakpoint(24, ttl_seconds=300)])
    run_all(core)
    # Churn through unrelated prompts that need most of the pool.
    for i in range(6):
        core.add_request(f"x{i}", list(range(1000 + 40 * i, 1040 + 40 * i)), SamplingParams(max_tokens=1))
        run_all(core)
    core.add_request("hit", system + [2], SamplingParams(max_tokens=1))
    assert run_all(core)["hit"].num_cached_tokens == 24
    # After the TTL (refreshed by that hit) runs out, the pages become evictable again.
    clock.t += 301
    for i in range(6):
        core.add_request(f"y{i}", list(range(5000 + 40 * i, 5040 + 40 * i)), SamplingParams(max_tokens=1))
        run_all(core)
    core.add_request("miss", system + [3], SamplingParams(max_tokens=1))
    assert run_all(core)["miss"].num_cached_tokens == 0
    assert core.num_free_blocks() == core.kv.num_blocks


def test_unpinned_prefix_is_evicted_under_the_same_pressure():
    core = make_core(num_blocks=16, block_size=4, script=lambda r: [EOS])
    system = list(range(100, 124))
    core.add_request("plain", system + [1], SamplingParams(max_tokens=1))
    run_all(core)
    for i in range(6):
        core.add_request(f"x{i}", list(range(1000 + 40 * i, 1040 + 40 * i)), SamplingParams(max_tokens=1))
        run_all(core)
    core.add_request("after", system + [2], SamplingParams(max_tokens=1))
    assert run_all(core)["after"].num_cached_tokens == 0


def test_bad_sampling_params_are_clear_errors():
    for kwargs, msg in [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                        ({"max_tokens": 0}, "max_tokens"), ({"min_p": 2}, "min_p"),
                        ({"stop": [""]}, "stop"), ({"n": 2}, "n must be 1")]:
        with pytest.raises(ValueError, match=msg):
            SamplingParams(**kwargs)


def test_pins_give_way_when_a_request_could_otherwise_never_run():
    clock = FakeClock()
    core = make_core(num_blocks=16, block_size=4, clock=clock, script=lambda r: [EOS],
                     max_pinned_fraction=0.5)
    core.add_request("pinned", list(range(100, 133)), SamplingParams(max_tokens=1),
                     cache_breakpoints=[CacheBreakpoint(32, ttl_seconds=3600)])
    run_all(core)
    assert core.kv.pool.stats().num_pinned == 8
    # Needs 13 of the 16 pages while 8 sit pinned and idle: pins must yield, not hang the queue.
    core.add_request("big", list(range(1000, 1050)), SamplingParams(max_tokens=2))
    outs = run_all(core)
    assert outs["big"].outputs[0].finish_reason == "stop"
    assert core.num_free_blocks() == core.kv.num_blocks
