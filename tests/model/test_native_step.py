"""Decode steps through the native decoder layer (model/kernels/decode_layer.c via
model/native_step.py) against the same bfloat16 model run as torch ops.

Every architecture switch the layer kernel implements is exercised: GQA, MQA, q/k/v bias with
tied embeddings (Qwen2), per-head q/k RMSNorm (Qwen3), a sliding window shorter than the
prompts (Mistral). Both runs round every op to bfloat16 at the same points except RoPE (once
here, after each op in torch), so many steps agree exactly and the rest within bfloat16 noise:
measured, native-vs-torch logprob gaps up to ~0.1 where each is 0.2-0.3 from float32.
"""
from __future__ import annotations

import random

import pytest
import torch
import transformers

from tokenfactory.engine.sampling_params import SamplingParams
from tokenfactory.model import kernels
from tokenfactory.model.runner import TorchExecutor

from .conftest import run_engine

pytestmark = pytest.mark.skipif(kernels.library() is None,
                                reason=f"native kernel unavailable: {kernels.unavailable_reason}")

BASE = dict(hidden_size=256, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=512,
            initializer_range=0.3, head_dim=64)
VARIANTS = {
    "llama_gqa": (transformers.LlamaConfig, {}),
    "llama_mqa": (transformers.LlamaConfig, dict(num_key_value_heads=1)),
    "qwen2_bias_tied": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3_qk_norm": (transformers.Qwen3Config, {}),
    "mistral_window": (transformers.MistralConfig, dict(sliding_window=24)),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cls, overrides = VARIANTS[name]
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(cls(**{**BASE, **overrides}),
                                                                  dtype=torch.float32).eval()
            with torch.no_grad():   # non-trivial biases and norm weights
                for pname, p in model.named_parameters():
                    if pname.endswith("bias"):
                        p.normal_(0.0, 0.3)
                    elif "norm" in pname:
                        p.uniform_(0.5, 1.5)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            cache[name] = path
        return cache[name]
    return get


def gaps_to_reference(run, ref) -> list[float]:
    """|logprob gap| of the chosen token per step, over the steps where both picked the same
    tokens so far (these random models are chaotic in bfloat16: after a fork nothing compares)."""
    gaps = []
    for a, b in zip(run, ref):
        for i, (ta, tb) in enumerate(zip(a.outputs[0].token_ids, b.outputs[0].token_ids)):
            if ta != tb:
                break
            gaps.append(abs(a.outputs[0].logprobs[i][ta].logprob - b.outputs[0].logprobs[i][tb].logprob))
    return gaps


@pytest.mark.parametrize("name", list(VARIANTS))
def test_native_decode_matches_torch_ops(models, name, monkeypatch):
    gen = random.Random(3)
    prompts = [[gen.randrange(512) for _ in range(n)] for n in (5, 40, 17, 63)]
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=2, ignore_eos=True)
    calls = []
    real = kernels.decode_step
    monkeypatch.setattr(kernels, "decode_step", lambda *a: calls.append(a[2].shape[0]) or real(*a))
    native = TorchExecutor(models(name), dtype="bfloat16")
    assert native.native_decode
    got, _ = run_engine(native, prompts, params, block_size=16)
    monkeypatch.undo()
    torch_ops = TorchExecutor(models(name), dtype="bfloat16", native_decode=False)
    want, _ = run_engine(torch_ops, prompts, params, block_size=16)
    assert calls and max(calls) >= 2    # decode steps, batched ones among them, ran natively
    for g, w in zip(got, want):
        # token 0 comes from the prefill (torch ops in both); token 1 is the first native
        # decode, from the very same context: the two paths' logprobs agree closely there
        assert g.outputs[0].token_ids[0] == w.outputs[0].token_ids[0]
        first = w.outputs[0].token_ids[1]
        assert g.outputs[0].logprobs[1][first].logprob == pytest.approx(
            w.outputs[0].logprobs[1][first].logprob, abs=0.1)
    # Later steps: these random models amplify bfloat16 rounding until the two paths may pick
    # different tokens (each also strays 0.2-0.4 from float32 at times), so compare where it
    # counts: native steps are no farther from the float32 model (which matches transformers,
    # test_parity) than the torch ops are
    f32, _ = run_engine(TorchExecutor(models(name), dtype="float32"), prompts, params,
                        block_size=16)
    native_gaps, torch_gaps = gaps_to_reference(got, f32), gaps_to_reference(want, f32)
    assert len(native_gaps) >= 8 and len(torch_gaps) >= 8
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(native_gaps) <= mean(torch_gaps) + 0.05


def test_batches_above_the_native_limit_fall_back(models, monkeypatch):
    """More than kernels.LINEAR_MAX_ROWS decodes in a step run as torch ops, with the same
    results, and the native step takes the batch again once it is small enough."""
    gen = random.Random(4)
    n = kernels.LINEAR_MAX_ROWS + 2
    prompts = [[gen.randrange(512) for _ in range(gen.randrange(3, 30))] for _ in range(n)]
    params = [SamplingParams(temperature=0, max_tokens=3 + (i % 3), logprobs=2,
                             ignore_eos=True) for i in range(n)]
    sizes = []
    real = kernels.decode_step
    monkeypatch.setattr(kernels, "decode_step", lambda *a: sizes.append(a[2].shape[0]) or real(*a))
    native = TorchExecutor(models("llama_gqa"), dtype="bfloat16")
    got, _ = run_engine(native, prompts, params, block_size=16, max_num_seqs=n)
    monkeypatch.undo()
    torch_ops = TorchExecutor(models("llama_gqa"), dtype="bfloat16",
                              native_decode=False)
    want, _ = run_engine(torch_ops, prompts, params, block_size=16, max_num_seqs=n)
    assert sizes and max(sizes) <= kernels.LINEAR_MAX_ROWS
    gaps = gaps_to_reference(got, want)
    assert len(gaps) >= 2 * n and sum(gaps) / len(gaps) < 0.05


def test_native_decode_refused_where_unsupported(checkpoint):
    """float32 models (and head sizes the attention kernel lacks) keep the torch path; asking
    for native decode there is a clear error, not a silent fallback."""
    path = checkpoint("llama_gqa")[0]        # head_dim 16
    assert not TorchExecutor(path, dtype="float32").native_decode
    assert not TorchExecutor(path, dtype="bfloat16").native_decode
    with pytest.raises(ValueError, match="native decode"):
        TorchExecutor(path, dtype="bfloat16", native_decode=True)


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2_bias_tied", "mistral_window"])
def test_rows_of_one_sequence_equal_plain_decode_steps(models, name):
    """What greedy speculation relies on: a token and its drafts verified as rows of one native
    step (consecutive positions over one block table, beside another sequence's row) give the
    logits plain one-row decode steps give at those positions, bit for bit. The K/V of the
    rows' positions are poisoned (NaN) first, so each row must attend to the K/V the same call
    wrote for the rows before it. Pages of 4 positions: drafts cross page boundaries; the
    Mistral variant's 24-position window slides within a draft."""
    ex = TorchExecutor(models(name), dtype="bfloat16")
    ex.initialize_cache(num_blocks=32, block_size=4)
    step = ex._native
    gen = random.Random(5)
    tokens = [gen.randrange(512) for _ in range(48)]
    mine, theirs = list(range(12)), list(range(12, 24))
    slot = lambda p, pages: pages[p // 4] * 4 + p % 4  # noqa: E731
    with torch.inference_mode():
        plain, plain_other = [], []
        for p in range(40):      # one row per step: each row alone (the 1-row linear path)
            plain.append(step([tokens[p]], [p], [slot(p, mine)], [mine])[0])
            plain_other.append(step([tokens[-1 - p]], [p], [slot(p, theirs)], [theirs])[0])
        for start, rows in [(24, 7), (26, 3), (29, 5), (34, 2), (36, 1), (30, 7)]:   # prefix valid
            for layer in ex.model.layers:
                for cache in (layer.self_attn.k_cache, layer.self_attn.v_cache):
                    for p in range(start, 48):
                        cache[:, mine[p // 4], p % 4] = float("nan")
            pos = list(range(start, start + rows))
            logits = step([tokens[p] for p in pos] + [tokens[-1 - 20]], pos + [20],
                          [slot(p, mine) for p in pos] + [slot(20, theirs)],
                          [mine] * rows + [theirs])
            for i, p in enumerate(pos):
                assert torch.equal(logits[i], plain[p]), (start, rows, i)
            assert torch.equal(logits[rows], plain_other[20])
