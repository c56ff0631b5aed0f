"""The native small-batch bfloat16 linear kernel (model/kernels/linear.c) and its use.

Checked against float32 matmuls of the same bfloat16 inputs on shapes that hit every path of
the kernel: 1-4 rows (one pass) and more (passes of 4, a remainder of 1-3), input widths that
are and are not multiples of 64 (the 32-wide tail), strided activation and output rows, bias,
NaN. Then its float32-sum form (logits) and the fused prefill glue (residual add + RMSNorm,
RoPE).
"""
from __future__ import annotations

import pytest
import torch

from tokenfactory.model import kernels

pytestmark = pytest.mark.skipif(kernels.library() is None,
                                reason=f"native kernel unavailable: {kernels.unavailable_reason}")


def reference(x, w, b):
    y = x.float() @ w.float().T
    return y if b is None else y + b.float()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 11])
@pytest.mark.parametrize("in_features", [32, 96, 768])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_float32_matmul(rows, in_features, bias):
    gen = torch.Generator().manual_seed(rows * 1000 + in_features)
    out_features = 37                     # odd: rows do not split evenly over threads
    x = torch.randn(rows, in_features, generator=gen).bfloat16()
    w = torch.randn(out_features, in_features, generator=gen).bfloat16()
    b = torch.randn(out_features, generator=gen).bfloat16() if bias else None
    got = kernels.linear(x, w, b)
    assert got.shape == (rows, out_features) and got.dtype == torch.bfloat16
    # float32 accumulation: only the single rounding of each output to bfloat16 remains
    torch.testing.assert_close(got.float(), reference(x, w, b), atol=1e-2, rtol=8e-3)


def test_strided_rows_in_and_out():
    gen = torch.Generator().manual_seed(7)
    wide = torch.randn(3, 200, generator=gen).bfloat16()
    x = wide[:, 8:136]                    # (3, 128) rows 200 apart
    w = torch.randn(24, 128, generator=gen).bfloat16()
    out_wide = torch.full((3, 40), 7.0, dtype=torch.bfloat16)
    out = out_wide[:, 4:28]
    kernels.linear(x, w, None, out)
    torch.testing.assert_close(out.float(), reference(x, w, None), atol=1e-2, rtol=8e-3)
    assert bool((out_wide[:, :4] == 7).all()) and bool((out_wide[:, 28:] == 7).all())


def test_nan_propagates_and_bad_shapes_are_refused():
    x = torch.ones(1, 64, dtype=torch.bfloat16)
    w = torch.ones(4, 64, dtype=torch.bfloat16)
    w[2, 5] = float("nan")
    y = kernels.linear(x, w, None)
    assert torch.isnan(y[0, 2]) and not torch.isnan(y[0, [0, 1, 3]]).any()
    assert not kernels.supports_linear(torch.bfloat16, 48)
    assert not kernels.supports_linear(torch.float32, 64)
    with pytest.raises(ValueError, match="rejected"):
        kernels.linear(torch.ones(1, 48, dtype=torch.bfloat16),
                       torch.ones(4, 48, dtype=torch.bfloat16), None)


@pytest.mark.parametrize("rows", [1, 5, 13])
def test_float32_logits_are_not_rounded_to_bfloat16(rows):
    """linear_f32 (logits) keeps the float32 sums: far closer to a float32 matmul of the same
    inputs than any bfloat16 output can be, so near-ties stay ordered instead of tying."""
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=gen).bfloat16()
    w = torch.randn(300, 96, generator=gen).bfloat16()
    got = kernels.linear_f32(x, w)
    ref = reference(x, w, None)
    assert got.dtype == torch.float32 and got.shape == (rows, 300)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)
    assert not torch.equal(got, got.bfloat16().float())   # a rounded output would equal this


def test_model_logits_are_float32_sums_in_bfloat16():
    """A bfloat16 model's compute_logits (prefill chunks) uses the float32-summed kernel, the
    same sums the native decode step writes, not oneDNN's bfloat16-rounded output."""
    from tokenfactory.model.config import ModelConfig
    from tokenfactory.model.layers import use_cpu_linears
    from tokenfactory.model.llama import LlamaForCausalLM
    cfg = ModelConfig(architecture="LlamaForCausalLM", hidden_size=64, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=128,
                      vocab_size=500, rms_norm_eps=1e-5, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    use_cpu_linears(model)
    hidden = torch.randn(3, 64).bfloat16()
    got = model.compute_logits(hidden)
    torch.testing.assert_close(got, kernels.linear_f32(hidden, model.lm_head.weight))
    torch.testing.assert_close(got, reference(hidden, model.lm_head.weight, None),
                               atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 7, 60])
def test_fused_prefill_glue_matches_torch_ops(rows):
    """The native residual-add + RMSNorm and RoPE (one call each in prefill layers) against
    the torch ops they replace, computed in float32."""
    from tokenfactory.model.rope import apply_rope
    torch.manual_seed(rows)
    bf = torch.bfloat16
    x = torch.randn(rows, 576, dtype=bf)
    delta = torch.randn(rows, 576, dtype=bf)
    w = (torch.rand(576) + 0.5).to(bf)
    stream = x.clone()
    normed = kernels.add_rms_norm(stream, delta, w, 1e-5)
    want_x = (x.float() + delta.float()).to(bf)
    assert torch.equal(stream, want_x)                     # updated in place, bf16 sums
    want = torch.nn.functional.rms_norm(want_x.float(), (576,), w.float(), 1e-5)
    torch.testing.assert_close(normed.float(), want, atol=0.02, rtol=0.01)
    plain = kernels.add_rms_norm(want_x.clone(), None, w, 1e-5)
    assert torch.equal(plain, normed)

    qkv = torch.randn(rows, 15 * 64, dtype=bf)           # 9 q + 3 k heads rotated, 3 v heads not
    angles = torch.rand(rows, 32) * 6
    cos = torch.cat((angles.cos(), angles.cos()), -1).to(bf)
    sin = torch.cat((-angles.sin(), angles.sin()), -1).to(bf)
    want = apply_rope(qkv[:, :12 * 64].float().view(rows, 12, 64), cos.float(), sin.float())
    v_before = qkv[:, 12 * 64:].clone()
    kernels.rope_(qkv[:, :12 * 64].view(rows, 12, 64), cos, sin)
    torch.testing.assert_close(qkv[:, :12 * 64].float().view(rows, 12, 64), want,
                               atol=0.03, rtol=0.01)
    assert torch.equal(qkv[:, 12 * 64:], v_before)


@pytest.mark.parametrize("in_features", [96, 576])
def test_each_row_is_the_same_with_any_number_of_rows(in_features):
    """A row's outputs do not depend on how many rows share the call (1 row streams each weight
    row alone, 2+ rows run register tiles of 12 weight rows): bit for bit, for every row count
    the native decode step runs (a token and its drafts), with the float32 (logits) and the
    bfloat16 outputs, across whole tiles and the leftover weight rows (out 12 * 5 + 7)."""
    gen = torch.Generator().manual_seed(in_features)
    w = torch.randn(67, in_features, generator=gen).bfloat16()
    b = torch.randn(67, generator=gen).bfloat16()
    x = torch.randn(16, in_features, generator=gen).bfloat16()
    alone = torch.cat([kernels.linear(x[i:i + 1], w, b) for i in range(16)])
    alone32 = torch.cat([kernels.linear_f32(x[i:i + 1], w) for i in range(16)])
    for rows in (2, 3, 4, 5, 6, 7, 8, 9, 13):
        assert torch.equal(kernels.linear(x[:rows], w, b), alone[:rows]), rows
        assert torch.equal(kernels.linear_f32(x[3:3 + rows], w), alone32[3:3 + rows]), rows
