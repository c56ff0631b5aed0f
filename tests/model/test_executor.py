"""TorchExecutor end to end through EngineCore: seeds, logprobs, prompt logprobs, bf16."""
from __future__ import annotations

import random

import pytest
import torch

from tokenfactory.engine.sampling_params import SamplingParams
from tokenfactory.model.runner import TorchExecutor

from .conftest import run_engine


@pytest.fixture(scope="module")
def fp32(checkpoint):
    return TorchExecutor(checkpoint("llama_gqa")[0], dtype="float32")


def generate(ex, prompts, params, **cfg):
    return run_engine(ex, prompts, params, require_length=True, **cfg)


def _prompts(n, seed=0, lo=5, hi=30):
    gen = random.Random(seed)
    return [[gen.randrange(512) for _ in range(gen.randrange(lo, hi))] for _ in range(n)]


def test_seeded_sampling_independent_of_batch_and_preemption(fp32):
    prompts = _prompts(5)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=12)
    alone, _ = generate(fp32, [prompts[0]], seeded)
    others = [SamplingParams(temperature=1.0, max_tokens=12)] * 4
    batched, _ = generate(fp32, prompts, [seeded] + others)
    assert batched[0].outputs[0].token_ids == alone[0].outputs[0].token_ids
    # a cache too small for everyone at once forces preemption and recompute
    tight, engine = generate(fp32, prompts[::-1], others + [seeded], num_kv_blocks=14)
    assert any(o.metrics.num_preemptions for o in tight)
    assert tight[-1].outputs[0].token_ids == alone[0].outputs[0].token_ids
    again, _ = generate(fp32, [prompts[0]], seeded)
    assert again[0].outputs[0].token_ids == alone[0].outputs[0].token_ids


def test_prompt_logprobs_and_logprobs_match_transformers(fp32, checkpoint):
    _, hf = checkpoint("llama_gqa")
    prompt = _prompts(1, seed=4, lo=20, hi=21)[0]
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=3, prompt_logprobs=2)
    # budget 8: the prompt is prefilled in three chunks
    (out,), _ = generate(fp32, [prompt], params, max_num_batched_tokens=8)
    plp = out.prompt_logprobs
    assert len(plp) == len(prompt) and plp[0] is None
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + out.outputs[0].token_ids])).logits[0].log_softmax(-1)
    for j in range(1, len(prompt)):
        entry = plp[j]
        assert prompt[j] in entry and len(entry) in (2, 3)
        assert entry[prompt[j]].logprob == pytest.approx(ref[j - 1, prompt[j]].item(), abs=1e-4)
        assert entry[prompt[j]].rank == int((ref[j - 1] > ref[j - 1, prompt[j]]).sum()) + 1
    assert len(out.outputs[0].logprobs) == 4
    for i, (tok, entry) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
        pos = len(prompt) - 1 + i
        assert entry[tok].rank == 1  # greedy
        assert entry[tok].logprob == pytest.approx(ref[pos, tok].item(), abs=1e-4)
        assert len(entry) == 3


def test_bfloat16_mostly_agrees_with_float32(checkpoint, fp32):
    bf16 = TorchExecutor(checkpoint("llama_gqa")[0], dtype="bfloat16")
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16
    assert bf16.kv_cache_bytes_per_block(16) * 2 == fp32.kv_cache_bytes_per_block(16)
    prompts = _prompts(4, seed=9)
    params = SamplingParams(temperature=0, max_tokens=8)
    a, _ = generate(fp32, prompts, params)
    b, _ = generate(bf16, prompts, params)
    firsts = sum(x.outputs[0].token_ids[0] == y.outputs[0].token_ids[0] for x, y in zip(a, b))
    assert firsts >= 3


def test_execute_requires_cache(checkpoint):
    from tokenfactory.engine.step import StepPlan
    ex = TorchExecutor(checkpoint("llama_gqa")[0], dtype="float32")
    with pytest.raises(RuntimeError, match="initialize_cache"):
        ex.execute(StepPlan([], 16))
    assert ex.max_model_len == 256
    assert ex.kv_cache_bytes_per_block(16) == 2 * 2 * 16 * 2 * 16 * 4


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])
def test_cpu_linear_matches_stock_linear_at_every_batch_size(checkpoint, rows):
    """Small batches take the native kernel (where the CPU has one), larger ones oneDNN: both
    agree with F.linear on the same bfloat16 weights, bias included (Qwen2's qkv)."""
    ex = TorchExecutor(checkpoint("qwen2_tied")[0], dtype="bfloat16")
    for layer in (ex.model.layers[0].self_attn.qkv_proj, ex.model.lm_head):
        x = torch.randn(rows, layer.in_features, dtype=torch.bfloat16)
        want = torch.nn.functional.linear(x.float(), layer.weight.float(),
                                          None if layer.bias is None else layer.bias.float())
        torch.testing.assert_close(layer(x).float(), want, atol=0.05, rtol=0.02)


def test_executor_weights_live_on_huge_page_memory_once(checkpoint):
    """The executor moves the weights into one huge-page arena (hugepages.relocate): tied
    weights stay one tensor, nothing is a view (torch.compile copies a view's whole base
    when it writes to it), and the KV cache gets huge-page memory of its own."""
    ex = TorchExecutor(checkpoint("qwen2_tied")[0], dtype="bfloat16")
    model = ex.model
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    storages = {t.untyped_storage().data_ptr() for t in model.parameters()}
    storages |= {t.untyped_storage().data_ptr() for t in model.buffers()
                 if t.layout == torch.strided}
    assert len(storages) == 1
    assert all(not t._is_view() for t in model.parameters())
    ex.initialize_cache(num_blocks=4, block_size=16)
    cache = model.layers[0].self_attn.k_cache
    assert not cache._is_view() and cache.untyped_storage().data_ptr() not in storages
    assert bool((cache == 0).all())


def test_decode_groups_split_by_length():
    from tokenfactory.model.runner import _decode_groups
    assert _decode_groups([]) == []
    assert _decode_groups([1] * 5) == [(0, 5)]
    assert _decode_groups([3] * 40) == [(0, 16), (16, 32), (32, 40)]
    pages = [1] * 8 + [2] * 8 + [10] * 3
    assert _decode_groups(pages) == [(0, 8), (8, 16), (16, 19)]
    groups = _decode_groups(sorted([3, 50, 7, 9, 120, 4, 33, 2, 80, 64, 5, 6, 11, 90, 13, 1, 2]))
    assert groups[0][0] == 0 and groups[-1][1] == 17
    assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))


def test_many_decodes_of_mixed_lengths_equal_one_at_a_time(fp32):
    """16 sequences decode together in several length groups; each equals its solo run."""
    prompts = _prompts(16, seed=21, lo=2, hi=90)
    params = SamplingParams(temperature=0, max_tokens=6)
    together, _ = generate(fp32, prompts, params, max_num_seqs=16, max_num_batched_tokens=2048)
    for prompt, out in zip(prompts, together):
        (solo,), _ = generate(fp32, [prompt], params)
        assert out.outputs[0].token_ids == solo.outputs[0].token_ids


def test_small_decode_steps_run_on_decode_threads(fp32, monkeypatch):
    """With decode_threads set, decode-only steps of up to DECODE_THREADS_MAX_BATCH sequences
    run on that many threads, every other step on all of them; float32 outputs are the same
    either way."""
    from tokenfactory.model import runner
    prompts = _prompts(6, seed=3)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    def tokens(outs):
        return [o.outputs[0].token_ids for o in outs[0]]

    reference = tokens(generate(fp32, prompts, params))
    seen = []
    real_execute = fp32._execute

    def spy(plan):
        small = (len(plan.requests) <= runner.DECODE_THREADS_MAX_BATCH
                 and all(c.num_tokens == 1 for c in plan.requests))
        seen.append((small, torch.get_num_threads()))
        return real_execute(plan)

    monkeypatch.setattr(fp32, "_execute", spy)
    monkeypatch.setattr(fp32, "decode_threads", 1)
    try:
        assert tokens(generate(fp32, prompts, params, max_num_seqs=3)) == reference
        assert tokens(generate(fp32, prompts[:1], params)) == reference[:1]
    finally:
        torch.set_num_threads(fp32.num_threads)
    assert {threads for small, threads in seen if small} == {1}
    assert {threads for small, threads in seen if not small} == {fp32.num_threads}


@pytest.mark.parametrize("name", ["llama_gqa", "llama_mqa", "qwen3", "mistral_sw"])
def test_kv_bytes_per_block_agree_with_the_simulated_executor(checkpoint, name):
    """The economics' model description of the same config.json prices a KV page exactly as
    the torch executor allocates it, in float32 and bfloat16."""
    from tokenfactory.economics.catalog import load_hardware, load_model
    from tokenfactory.economics.simulated import SimulatedExecutor
    path = checkpoint(name)[0]
    spec = load_model(str(path))
    hw = load_hardware("h100")
    for dtype, kv_dtype in (("float32", "fp32"), ("bfloat16", "bf16")):
        ex = TorchExecutor(path, dtype=dtype)
        sim = SimulatedExecutor(spec, hw, kv_dtype=kv_dtype)
        for block_size in (1, 16):
            assert ex.kv_cache_bytes_per_block(block_size) == \
                sim.kv_cache_bytes_per_block(block_size), (dtype, block_size)


def test_device_reaches_the_executor_and_cpu_only_paths_stay_off(checkpoint, caplog):
    """device="meta" (a stand-in for a GPU: no data, no CPU kernels): the weights and KV pages
    live on it, and no native kernel, huge page or CPU linear is used; build_engine_core
    passes the device through. (Nothing can be computed on meta: the step itself is not
    run.)"""
    from tokenfactory.engine.llm import build_engine_core
    from tokenfactory.model.layers import CpuLinear
    path = checkpoint("llama_gqa")[0]
    ex = TorchExecutor(path, dtype="bfloat16", device="meta", kernels="auto")
    assert ex.device.type == "meta" and ex.model.embed_tokens.weight.device.type == "meta"
    assert not ex._lib_ok and ex._native is None and not ex.native_decode
    assert not any(isinstance(m, CpuLinear) for m in ex.model.modules())
    assert ex.kernel_choice.mode in ("auto", "torch", "default") and not ex._choice_pending
    ex.initialize_cache(4, 16)
    cache = ex.model.layers[0].self_attn.k_cache
    assert cache.device.type == "meta" and cache.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="native"):
        TorchExecutor(path, dtype="bfloat16", device="meta", kernels="native")
    from tokenfactory.model.demo import ensure_demo_checkpoint
    core = build_engine_core(ensure_demo_checkpoint(), dtype="bfloat16", device="meta",
                             num_kv_blocks=4)
    assert core.executor.device.type == "meta" and core.executor._native is None


def test_logit_bias_shifts_the_greedy_choice(fp32):
    """SamplingParams.logit_bias ({token: bias}) is added to the logits before the choice;
    an unbiased run is unchanged."""
    from tokenfactory.engine.sampling_params import SamplingParams as SP
    if "logit_bias" not in {f for f in SP.__dataclass_fields__}:
        pytest.skip("SamplingParams has no logit_bias field yet")
    prompt = _prompts(1, seed=4)
    plain, _ = generate(fp32, prompt, SP(temperature=0, max_tokens=3))
    first = plain[0].outputs[0].token_ids
    banned, _ = generate(fp32, prompt, SP(temperature=0, max_tokens=3,
                                          logit_bias={first[0]: -100.0}))
    assert banned[0].outputs[0].token_ids[0] != first[0]
    forced, _ = generate(fp32, prompt, SP(temperature=0, max_tokens=3, logit_bias={77: 100.0}))
    assert forced[0].outputs[0].token_ids == [77, 77, 77]
