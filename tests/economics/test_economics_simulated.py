"""The simulated executor drives the real engine and advances a roofline clock."""

import pytest

from tokenfactory.economics import CostLedger, load_hardware, load_model, step_time_seconds
from tokenfactory.economics.simulated import SimulatedExecutor

import tokenfactory.engine.core as engine_core
from tokenfactory.engine.sampling_params import SamplingParams


def test_simulated_executor_runs_the_engine_and_charges_the_ledger():
    model, h100 = load_model("llama-3-70b"), load_hardware("h100")
    sim = SimulatedExecutor(model, h100, tp=2, fallback_token=7)
    assert sim.kv_cache_bytes_per_block(16) == 16 * 327_680
    ledger = CostLedger(cost_per_hour=2 * 2.50, watts=2 * 700)
    core = engine_core.EngineCore(
        sim, engine_core.EngineConfig(num_kv_blocks=512, block_size=16),
        model_max_len=8192, eos_token_ids=[0], clock=sim.now, step_hook=ledger.record_step)
    core.add_request("long", list(range(1, 1001)), SamplingParams(max_tokens=8, ignore_eos=True))
    core.add_request("short", [1, 2, 3], SamplingParams(max_tokens=8, ignore_eos=True))
    for _ in range(1000):
        if not core.has_unfinished_requests():
            break
        core.step()
    assert not core.has_unfinished_requests()
    # a decode step of a 70B model on 2 x H100 is ~21 ms; the whole run is well under a second
    assert sim.num_steps >= 8
    assert 8 * 0.020 < sim.clock_seconds < 1.0
    long, short = ledger.finish("long"), ledger.finish("short")
    assert long.machine_seconds > short.machine_seconds     # its 1,000-token prefill
    assert long.machine_seconds + short.machine_seconds == pytest.approx(sim.clock_seconds)
    one_decode = step_time_seconds(model, h100, [1], [1000], tp=2)
    assert sim.last_step.seconds >= one_decode * 0.99
