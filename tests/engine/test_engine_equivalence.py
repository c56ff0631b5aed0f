"""Every engine path produces the same tokens as the plain one: batching, prefix-cache hits,
chunked prefill and preemption are invisible in the output (real model, greedy and seeded)."""
from __future__ import annotations

import random

import pytest

from tokenfactory.engine.core import EngineConfig, EngineCore
from tokenfactory.engine.sampling_params import SamplingParams


def make_core(model_dir, **cfg) -> EngineCore:
    from tokenfactory.model.runner import TorchExecutor
    ex = TorchExecutor(model_dir, dtype="float32")
    cfg.setdefault("num_kv_blocks", 256)
    return EngineCore(ex, EngineConfig(**cfg), model_max_len=ex.max_model_len, eos_token_ids=[])


def run(core: EngineCore, prompts, params, stagger=False) -> list[list[int]]:
    """Submit all prompts (or one per step when staggered) and collect output tokens in order."""
    done: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    if not stagger:
        for i, p in pending:
            core.add_request(str(i), p, params if isinstance(params, SamplingParams) else params[i])
        pending = []
    while pending or core.has_unfinished_requests():
        if pending:
            i, p = pending.pop(0)
            core.add_request(str(i), p, params if isinstance(params, SamplingParams) else params[i])
        for out in core.step():
            if out.finished:
                assert out.outputs[0].finish_reason == "length", out.error
                done[out.request_id] = out.outputs[0].token_ids
    assert core.num_free_blocks() == core.kv.num_blocks
    return [done[str(i)] for i in range(len(prompts))]


def prompts_of(lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in lengths]


GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    """One request at a time, no prefix caching, no chunking: the plain path."""
    core = make_core(tiny_llama_dir, enable_prefix_caching=False, max_num_batched_tokens=4096)
    prompts = prompts_of([5, 17, 33, 64, 90, 130])
    return prompts, [run(core, [p], GREEDY)[0] for p in prompts]


def test_batched_equals_one_at_a_time(tiny_llama_dir, reference):
    prompts, expected = reference
    core = make_core(tiny_llama_dir, max_num_batched_tokens=4096)
    assert run(core, prompts, GREEDY) == expected
    core = make_core(tiny_llama_dir, max_num_batched_tokens=4096)
    assert run(core, prompts, GREEDY, stagger=True) == expected  # joins running decodes


def test_chunked_prefill_equals_unchunked(tiny_llama_dir, reference):
    prompts, expected = reference
    core = make_core(tiny_llama_dir, max_num_batched_tokens=24, enable_prefix_caching=False)
    assert run(core, prompts, GREEDY) == expected


def test_prefix_cache_hit_equals_cold(tiny_llama_dir):
    shared = prompts_of([70], seed=3)[0]
    tails = prompts_of([3, 9, 20], seed=4)
    prompts = [shared + t for t in tails]
    cold = make_core(tiny_llama_dir, enable_prefix_caching=False)
    expected = [run(cold, [p], GREEDY)[0] for p in prompts]
    warm = make_core(tiny_llama_dir, block_size=8)
    got = []
    for p in prompts:
        core_out = run(warm, [p], GREEDY)[0]
        got.append(core_out)
    assert got == expected
    assert warm.kv.pool.stats().prefix_hits >= 2 * 64  # the later prompts did reuse pages


def test_preemption_equals_no_preemption(tiny_llama_dir, reference):
    prompts, expected = reference
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    # Few small pages: running requests must be preempted and recomputed to make room.
    core = make_core(tiny_llama_dir, num_kv_blocks=22, block_size=8, enable_prefix_caching=False)
    got = run(core, prompts, params)
    assert got == expected


def test_seeded_sampling_same_regardless_of_batch_and_preemption(tiny_llama_dir):
    prompts = prompts_of([10, 40, 70], seed=7)
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i, max_tokens=10, ignore_eos=True)
              for i in range(3)]
    alone = [run(make_core(tiny_llama_dir), [p], [q])[0] for p, q in zip(prompts, params)]
    together = run(make_core(tiny_llama_dir), prompts, params)
    squeezed = run(make_core(tiny_llama_dir, num_kv_blocks=14, block_size=8), prompts, params)
    assert together == alone
    assert squeezed == alone
