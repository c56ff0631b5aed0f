"""quant.c against ``gguf.quants`` (llama.cpp's reference quantizer and dequantizer on PyPI).

Blocks are made by the ``gguf`` package's quantizer from random floats. Two kernels:

* the exact one (``exact=True``, float32 models): the float64 product of the activations
  with ``gguf.quants.dequantize``'s weights up to float32 summation error;
* the decode one (default; the native step runs it): activations rounded to int8 per block
  of 32 (scale amax / 127, nearest-even codes), integer dot products. It must equal the float64
  product of the dequantized weights with those rounded activations (rounding reproduced here
  in numpy float32) up to float32 error, and so stay within the bound the rounding implies
  against the unrounded activations: sum_j |w_j| * step_j / 2.

The AVX-512 build (VNNI on this CPU), the portable scalar build (compiled here with
-march=x86-64) and an AVX-512 BF16 build without VNNI are all checked.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT
from gguf.quants import dequantize, quantize

from tokenfactory.model.kernels import quant

GGUF_TYPES = {"q8_0": GT.Q8_0, "q4_0": GT.Q4_0, "q4_1": GT.Q4_1}
pytestmark = pytest.mark.skipif(quant.library() is None, reason="native kernels unavailable")


@pytest.fixture(scope="module", params=["native", "scalar", "no-vnni"])
def lib(request, tmp_path_factory):
    if request.param == "native":
        return quant.library()
    if request.param == "scalar":
        return quant.build_standalone(["-O2", "-march=x86-64"], tmp_path_factory.mktemp("scalar"))
    # AVX-512 BF16 without VNNI: vectorized activation rounding, portable integer dots
    built = quant.build_standalone(["-O2", "-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw",
                                    "-mavx512vl", "-mavx512bf16"], tmp_path_factory.mktemp("nv"))
    assert quant.isa(built) == quant.ISA_NAMES[1]
    return built


def make_weight(kind: str, out: int, inp: int, seed: int):
    """(weight bytes uint8 (out, row_bytes), scales or None, float32 dequantized (out, inp))."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((out, inp)) * rng.uniform(0.01, 2.0, (out, 1))).astype(np.float32)
    if kind == "int8":
        scale = (np.abs(w).max(axis=1) / 127).astype(np.float32)
        q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
        return (torch.from_numpy(q.view(np.uint8).copy()), torch.from_numpy(scale),
                (q.astype(np.float32) * scale[:, None]).astype(np.float64))
    blocks = quantize(w, GGUF_TYPES[kind])
    return (torch.from_numpy(blocks.copy()), None,
            dequantize(blocks, GGUF_TYPES[kind]).astype(np.float64))


def block_scale(kind: str, blocks: torch.Tensor, scales) -> np.ndarray:
    """|d| of each weight's block (int8: its row scale), (out, in) float64."""
    raw = blocks.numpy()
    if kind == "int8":
        return np.broadcast_to(np.abs(scales.numpy())[:, None].astype(np.float64), raw.shape)
    bb = quant.BLOCK_BYTES[kind]
    d = raw.reshape(raw.shape[0], -1, bb)[..., :2].copy().view(np.float16)[..., 0]
    return np.repeat(np.abs(d.astype(np.float64)), 32, axis=1)


def int8_activations(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(the rounded activations dx * q as float64 (M, K), the step dx per value (M, K)): each
    block of 32 as quant.c rounds it, in numpy float32 (same IEEE operations)."""
    xf = x.float().numpy()
    m, k = xf.shape
    blocks = xf.reshape(m, k // 32, 32)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(blocks * inv)                          # float32 products, nearest even
    assert np.abs(q).max() <= 127
    step = (amax / np.float32(127)).astype(np.float32)
    xq = q.astype(np.float64) * step.astype(np.float64)
    return xq.reshape(m, k), np.broadcast_to(step, blocks.shape).reshape(m, k).astype(np.float64)


@pytest.mark.parametrize("kind", list(quant.KINDS))
@pytest.mark.parametrize("shape", [(64, 96), (40, 32), (33, 576)])   # odd block counts too
def test_qlinear_matches_block_math(lib, kind, shape):
    out, inp = shape
    blocks, scales, dense = make_weight(kind, out, inp, seed=out * inp)
    rng = np.random.default_rng(1)
    dscale = block_scale(kind, blocks, scales)
    for rows in (1, 2, 3, 4, 5, 8, 16, 17):
        x = torch.from_numpy(rng.standard_normal((rows, inp)).astype(np.float32) * 3)
        x = x.to(torch.bfloat16)
        if rows == 3:
            x[1] = 0                                           # an all-zero row
        if rows == 5:
            x[2, 7] = 300                                      # an outlier in one block
        xf = x.double().numpy()
        # exact: float32 sums of exact products; the error is bounded by the magnitudes
        # summed, partial sums of codes up to 15 |d| (Q4_1: plus m * sum(x))
        y = quant.qlinear(kind, blocks, scales, x, lib=lib, exact=True).numpy()
        mag = np.abs(xf) @ (np.abs(dense).T + 16 * dscale.T) + 1e-30
        err = np.abs(y - xf @ dense.T)
        assert (err <= 2e-6 * mag).all(), f"exact {kind} rows={rows}: {(err / mag).max():.3g}"
        # decode kernel: the same product with the int8-rounded activations
        y = quant.qlinear(kind, blocks, scales, x, lib=lib).numpy()
        xq, step = int8_activations(x)
        mag = np.abs(xq) @ (np.abs(dense).T + 16 * dscale.T) + 1e-30
        err = np.abs(y - xq @ dense.T)
        assert (err <= 2e-6 * mag).all(), f"int8 {kind} rows={rows}: {(err / mag).max():.3g}"
        assert np.abs(xq - xf).max() <= 0.5 * step.max()
        bound = (step / 2) @ np.abs(dense).T * (1 + 1e-6) + 2e-6 * mag
        assert (np.abs(y - xf @ dense.T) <= bound).all()
        if rows == 3:
            assert (y[1] == 0).all()


@pytest.mark.parametrize("kind", list(quant.KINDS))
def test_dequantize_bf16_matches_gguf(lib, kind):
    blocks, scales, dense = make_weight(kind, 50, 96, seed=7)
    full = quant.dequantize_bf16(kind, blocks, scales, 96, lib=lib)
    assert torch.equal(full, torch.from_numpy(dense).to(torch.bfloat16))
    ids = torch.tensor([49, 0, 7, 7])
    rows = quant.dequantize_bf16(kind, blocks, scales, 96, rows=ids, lib=lib)
    assert torch.equal(rows, full[ids])


def test_bad_shapes_are_refused():
    blocks, _, _ = make_weight("q4_1", 8, 64, seed=0)
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.qlinear("q4_1", blocks, None, torch.zeros(1, 48, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="unknown quantized kind"):
        quant.qlinear("q5_k", blocks, None, torch.zeros(1, 64, dtype=torch.bfloat16))


@pytest.mark.skipif(quant.library() is None or quant.library().tf_qlinear_isa() != 2,
                    reason="the prefill GEMM needs AVX-512 VNNI")
@pytest.mark.parametrize("kind", quant.GEMM_KINDS)
@pytest.mark.parametrize("shape", [(48, 96), (16, 576)])
def test_qgemm_matches_decode_kernel(kind, shape):
    """The packed GEMM (prefill) computes what the decode kernel computes: the dequantized
    weights (gguf.quants) times the int8-rounded activations, to float32 error; its bias and
    bfloat16 output are the float32 result plus bias, rounded once."""
    out, inp = shape
    blocks, _, dense = make_weight(kind, out, inp, seed=out + inp)
    packed = quant.pack(kind, blocks, inp)
    assert packed.numel() == blocks.numel()                   # the same bytes, reordered
    dscale = block_scale(kind, blocks, None)
    rng = np.random.default_rng(2)
    for rows in (1, 7, 9, 33, 300):                           # tails of 8-row tiles, > 256
        x = torch.from_numpy(rng.standard_normal((rows, inp)).astype(np.float32) * 3)
        x = x.to(torch.bfloat16)
        x[-1, 5] = 300                                         # an outlier in one block
        if rows > 1:
            x[0] = 0                                           # an all-zero row
        y = quant.qgemm(kind, packed, x, float_output=True).numpy()
        xq, _ = int8_activations(x)
        mag = np.abs(xq) @ (np.abs(dense).T + 16 * dscale.T) + 1e-30
        err = np.abs(y - xq @ dense.T)
        assert (err <= 2e-6 * mag).all(), f"{kind} rows={rows}: {(err / mag).max():.3g}"
        if rows > 1:
            assert (y[0] == 0).all()
        decode = quant.qlinear(kind, blocks, None, x).numpy()
        assert np.allclose(y, decode, rtol=0, atol=4e-6 * mag.max())
    bias = torch.from_numpy(rng.standard_normal(out).astype(np.float32)).to(torch.bfloat16)
    y32 = quant.qgemm(kind, packed, x, float_output=True)
    y16 = quant.qgemm(kind, packed, x, bias)
    assert y16.dtype == torch.bfloat16
    assert torch.equal(y16, (y32 + bias.float()).to(torch.bfloat16))


def test_pack_refuses_what_the_gemm_cannot_take():
    blocks, _, _ = make_weight("q4_1", 40, 64, seed=0)       # 40 rows: not groups of 16
    with pytest.raises(ValueError, match="multiple of 16"):
        quant.pack("q4_1", blocks, 64)
    assert not quant.gemm_supported("int8", 64, 64)
    assert not quant.gemm_supported("q4_1", 40, 64)
