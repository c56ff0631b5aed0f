"""quant.c against ``gguf.quants`` (llama.cpp's reference quantizer and dequantizer on PyPI).

Blocks are made by the ``gguf`` package's quantizer from random floats; each kernel's output
must equal the float64 product of the activations with ``gguf.quants.dequantize``'s weights
up to float32 summation error (the kernels do not round activations or weights). The
AVX-512 BF16 build and the portable scalar build (compiled here with -march=x86-64) are both
checked.
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


@pytest.fixture(scope="module", params=["native", "scalar"])
def lib(request, tmp_path_factory):
    if request.param == "native":
        return quant.library()
    return quant.build_standalone(["-O2", "-march=x86-64"], tmp_path_factory.mktemp("scalar"))


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


@pytest.mark.parametrize("kind", list(quant.KINDS))
@pytest.mark.parametrize("shape", [(64, 96), (40, 32), (33, 576)])   # odd block counts too
def test_qlinear_matches_block_math(lib, kind, shape):
    out, inp = shape
    blocks, scales, dense = make_weight(kind, out, inp, seed=out * inp)
    rng = np.random.default_rng(1)
    for rows in (1, 2, 3, 4, 5, 8, 16, 17):
        x = torch.from_numpy(rng.standard_normal((rows, inp)).astype(np.float32) * 3)
        x = x.to(torch.bfloat16)
        if rows == 3:
            x[1] = 0                                           # an all-zero row
        y = quant.qlinear(kind, blocks, scales, x, lib=lib).numpy()
        xf = x.double().numpy()
        ref = xf @ dense.T
        # float32 sums of exact products: the error is bounded by the magnitudes summed,
        # partial sums of codes up to 15 |d| (Q4_1: plus m * sum(x))
        mag = np.abs(xf) @ (np.abs(dense).T + 16 * block_scale(kind, blocks, scales).T) + 1e-30
        err = np.abs(y - ref)
        assert (err <= 2e-6 * mag).all(), f"{kind} rows={rows}: {(err / mag).max():.3g}"


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
