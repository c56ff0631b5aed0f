"""quant.c against references written from the GGUF block formats (numpy) and gguf.quants.

Blocks are made by the ``gguf`` package's own quantizer (llama.cpp's reference on PyPI) from
random floats. Two checks per kernel: the same arithmetic done in float64 (activations
quantized to int8 blocks as the kernel does; tight tolerance: only summation order differs),
and ``gguf.quants.dequantize`` + float32 matmul (looser: the activation rounding is real).
The AVX-512 VNNI build and the portable scalar build (compiled here with -march=x86-64) are
both checked.
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
                q.astype(np.float32) * scale[:, None])
    blocks = quantize(w, GGUF_TYPES[kind])
    return torch.from_numpy(blocks.copy()), None, dequantize(blocks, GGUF_TYPES[kind])


def quantize_x(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's activation quantization in float32: (q int (M, nb, 32), d (M, nb))."""
    xb = x.reshape(x.shape[0], -1, 32)
    d = (np.abs(xb).max(axis=2) / np.float32(127)).astype(np.float32)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
    return np.rint(xb * inv[..., None]).astype(np.int64), d


def lane_dots(wq: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Integer dot products per 4 values (one int32 lane of vpdpbusd): (M, N, nb, 8)."""
    n, nb = wq.shape[:2]
    prods = wq.reshape(1, n, nb, 8, 4) * q.reshape(q.shape[0], 1, nb, 8, 4)
    return prods.sum(4).astype(np.float64)


def same_math(kind: str, blocks: np.ndarray, scales, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """y and the sum of |terms| per int32 lane (float32 rounding of partial sums that cancel
    bounds the kernel's error), float64, from the block bytes."""
    q, dx = quantize_x(x)                                    # (M, nb, 32), (M, nb)
    out = blocks.shape[0]
    nb = q.shape[1]
    if kind == "int8":
        wq = blocks.view(np.int8).reshape(out, nb, 32).astype(np.int64)
        dots = lane_dots(wq, q)
        terms = dots * (dx[:, None, :] * scales[None, :, None])[..., None]
        return terms.sum((2, 3)), np.abs(terms).sum((2, 3))
    bb = quant.BLOCK_BYTES[kind]
    raw = blocks.reshape(out, nb, bb)
    d = raw[..., :2].copy().view(np.float16)[..., 0].astype(np.float64)       # (N, nb)
    if kind == "q8_0":
        wq = raw[..., 2:].copy().view(np.int8).astype(np.int64)
    else:
        qs = raw[..., bb - 16:].astype(np.int64)
        wq = np.concatenate([qs & 15, qs >> 4], axis=2) - (8 if kind == "q4_0" else 0)
    terms = lane_dots(wq, q) * (d[None] * dx[:, None, :])[..., None]
    if kind == "q4_1":
        m = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
        mterms = m[None] * (dx * q.sum(2))[:, None, :]
        return terms.sum((2, 3)) + mterms.sum(2), np.abs(terms).sum((2, 3)) + np.abs(mterms).sum(2)
    return terms.sum((2, 3)), np.abs(terms).sum((2, 3))


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
            x[1] = 0                                           # an all-zero row: scale 0
        y = quant.qlinear(kind, blocks, scales, x, lib=lib)
        xf = x.float().numpy()
        ref, mag = same_math(kind, blocks.numpy(), None if scales is None else scales.numpy(), xf)
        err = np.abs(y.numpy() - ref)
        assert (err <= 1e-5 * mag + 1e-6).all(), f"{kind} rows={rows}: {err.max()}"
        # and against the dequantized weight in float32: only the activation rounding differs
        dense_y = xf @ dense.T
        rel = np.linalg.norm(y.numpy() - dense_y) / np.linalg.norm(dense_y + 1e-30)
        assert rel < 0.02, f"{kind} rows={rows}: relative error {rel}"


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
