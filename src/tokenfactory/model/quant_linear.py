"""Weight-only quantized linear layers: GGUF Q8_0 / Q4_0 / Q4_1 blocks as stored, or int8
per output channel.

Why: on a CPU a decode step is a read of every weight byte, so bytes per weight set its speed
(Q4_1: 0.625 bytes, Q8_0 1.06, int8 1, bf16 2). :class:`QuantLinear` keeps the file's blocks
(a uint8 tensor, rows of whole blocks) and runs them through ``kernels/quant.c``. Activations
in bfloat16 (the served dtype) are rounded to int8 per block of 32 (scale amax / 127,
llama.cpp's Q8 activations) and meet the weight codes in integer dot products (AVX-512 VNNI):
the dequantized weights' product with activations each moved by at most half its block's step
(amax / 254). Two kernels compute that:

* the GEMM kernel (``quant.qgemm``, every row count, the native decode step too): on a copy
  of the blocks packed at load (16 output rows interleaved 4 bytes at a time: the same bytes
  in another order, see quant.c "Prefill GEMM"), so one ``vpdpbusd`` advances 16 output rows
  and the per-block float work is shared by them. SmolLM2's layer linears, one thread, CPU
  time, Q4_1: 2.0 / 6.8 / 46 / 382 ms at 1 / 8 / 60 / 512 rows, against 6.1 / 23 / 171 / - for
  the stored-layout kernel below and 29 / 36 / 87 / 573 for the old prefill path (dequantize
  to bfloat16 per call + oneDNN; bf16 weights through oneDNN: 13 / 20 / 83 / 554);
* the stored-layout kernel (``quant.qlinear``), up to :data:`NATIVE_MAX_ROWS` rows, where
  there is no packed copy (no AVX-512 VNNI, out_features not a multiple of 16, ``pack=False``).

float32 activations take the exact kernel instead (bfloat16 products, float32 sums) as two
bfloat16 halves (hi + lo: 16 mantissa bits, two passes): a float32 model then matches its
dequantized self to ~1e-5 (the reference for what the rounding costs). Above
``native_max_rows`` without a packed copy, and everywhere without native kernels (another
CPU, TOKENFACTORY_NATIVE_KERNELS=0), the weight is dequantized per call (``gguf.quants``
without the kernels) and torch multiplies.

The packed copy doubles the blocks' memory (SmolLM2 Q4_1: +96 MB with the lm_head); the
stored copy stays for the paths above and for the native step's table lookups.

``native_linear()`` describes the weight for the native decode step (model/linear_kernels.py,
H3's), which dispatches on its ``kind``.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tokenfactory.model.kernels import quant

log = logging.getLogger(__name__)

# Up to this many rows the native kernel runs; beyond, dequantize + oneDNN (see above).
NATIVE_MAX_ROWS = 8

KINDS = tuple(quant.KINDS)   # "q8_0", "q4_0", "q4_1", "int8"


def _gguf_dequantize(kind: str, blocks: torch.Tensor) -> np.ndarray:
    import gguf
    qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
    return gguf.quants.dequantize(blocks.numpy(), qtype)


class QuantLinear(nn.Module):
    """``y = x @ W^T + b`` with W stored quantized (see the module docstring).

    ``weight``: uint8 (out_features, row bytes), whole blocks per row as in the GGUF file
    (int8: the int8 values' bytes); ``scales``: float32 (out_features,) for int8, else None;
    ``bias``: (out_features,) or None, in the serving dtype. ``float_output``: return float32
    (logits: summed in float32 and never rounded to bfloat16, as the bf16 path does). ``pack``:
    also keep the GEMM kernel's packed copy (``packed``, uint8 (out / 16, 16 row bytes)) where
    that kernel runs here."""

    def __init__(self, kind: str, weight: torch.Tensor, in_features: int,
                 scales: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 float_output: bool = False, pack: bool = True):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown quantized kind {kind!r} (one of {', '.join(KINDS)})")
        if in_features % quant.BLOCK or weight.dim() != 2 or \
                weight.shape[1] != quant.row_bytes(kind, in_features):
            raise ValueError(f"{kind} weight of shape {tuple(weight.shape)} cannot hold rows of "
                             f"{in_features} values")
        self.kind, self.in_features, self.out_features = kind, in_features, weight.shape[0]
        self.float_output = float_output
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)
        self.native_max_rows = NATIVE_MAX_ROWS if quant.library() is not None else 0
        # the prefill GEMM's copy (same bytes as ``weight``), where that kernel runs
        packed = None
        if pack and quant.gemm_supported(kind, self.out_features, in_features):
            packed = quant.pack(kind, weight, in_features)
        self.register_buffer("packed", packed)

    def extra_repr(self) -> str:
        return (f"{self.kind}, in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as a dense (out, in) tensor of ``dtype`` (a fresh copy)."""
        if quant.library() is not None and dtype == torch.bfloat16:
            return quant.dequantize_bf16(self.kind, self.weight, self.scales, self.in_features)
        if self.kind == "int8":
            dense = self.weight.view(torch.int8).float() * self.scales[:, None]
        else:
            dense = torch.from_numpy(_gguf_dequantize(self.kind, self.weight))
        return dense.reshape(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        x2 = x.reshape(rows, self.in_features)                       # (M, K)
        if self.packed is not None and x2.dtype == torch.bfloat16:
            y = quant.qgemm(self.kind, self.packed, x2.contiguous(), self.bias,
                            float_output=self.float_output)         # (M, N)
            if y is not None:
                return y.view(*x.shape[:-1], self.out_features)
        if rows <= self.native_max_rows:
            if x2.dtype == torch.bfloat16:   # int8 activations, as the native decode step
                y = quant.qlinear(self.kind, self.weight, self.scales, x2.contiguous())
            else:   # float32 (or other) activations: two bfloat16 halves, 16 mantissa bits
                hi = x2.to(torch.bfloat16)
                lo = (x2.float() - hi.float()).to(torch.bfloat16)
                y = quant.qlinear(self.kind, self.weight, self.scales, hi.contiguous(),
                                  exact=True)
                y += quant.qlinear(self.kind, self.weight, self.scales, lo.contiguous(),
                                   exact=True)
            if self.bias is not None:
                y += self.bias
        else:
            dtype = torch.bfloat16 if x2.dtype == torch.bfloat16 else torch.float32
            y = F.linear(x2.to(dtype), self.dequantized(dtype), self.bias)
        y = y.float() if self.float_output else y.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def native_linear(self):
        """This weight for the native decode step (H3's ``NativeLinear``), or None where that
        interface or the kernels are missing. The bias, if any, must be bfloat16."""
        try:
            from tokenfactory.model.linear_kernels import NativeLinear
        except ImportError:
            return None
        if quant.library() is None or (self.bias is not None
                                       and self.bias.dtype != torch.bfloat16):
            return None
        # the GGUF kinds hand over their packed copy where int8 hands over its scales
        # (linear_kernels.py): quant.c then runs the GEMM kernel on it
        extra = self.scales if self.scales is not None else self.packed
        return NativeLinear(kind=self.kind, weight_ptr=self.weight.data_ptr(),
                            scales_ptr=0 if extra is None else extra.data_ptr(),
                            bias_ptr=0 if self.bias is None else self.bias.data_ptr(),
                            out_features=self.out_features, in_features=self.in_features,
                            owner=self)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 of a dense (out, in) weight: (uint8 bytes of the int8
    values (out, in), float32 scales (out,)); w ~= scale[n] * q[n, k], |q| <= 127."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1) / 127.0
    q = torch.round(w / torch.where(scales > 0, scales, 1.0)[:, None]).clamp_(-127, 127)
    return q.to(torch.int8).view(torch.uint8).contiguous(), scales.contiguous()


def int8_linear(linear: nn.Module, float_output: bool = False) -> QuantLinear:
    """A :class:`QuantLinear` of kind int8 from an ``nn.Linear``-like module (weight, bias)."""
    blocks, scales = quantize_int8(linear.weight)
    bias = None if linear.bias is None else linear.bias.detach().clone()
    return QuantLinear("int8", blocks, linear.weight.shape[1], scales, bias, float_output)


def use_int8_linears(model: nn.Module) -> int:
    """Replace the decoder layers' q/k/v, o, gate/up and down linears by int8 QuantLinears
    (the embedding and lm_head stay as they are, as vLLM's on-the-fly int8 does). Returns
    how many were replaced; layers whose input width is not a multiple of 32 are kept."""
    count = 0
    for layer in model.layers:
        for owner, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                            (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
            lin = getattr(owner, name)
            if isinstance(lin, nn.Linear) and lin.in_features % quant.BLOCK == 0:
                setattr(owner, name, int8_linear(lin))
                count += 1
    return count
