"""How a linear module hands its weights to the native decode step.

The native decode step (``native_step.py``, ``kernels/decode_layer.c``) runs every layer of a
small decode batch in one C call, so it cannot call a module's ``forward``. Instead each linear
module describes itself: ``module.native_linear() -> NativeLinear | None``. A description names
the weight format (``kind``) and hands over raw pointers; the C step dispatches on the kind
through one function, ``tf_linear_any``. A module that has no native form (a float32 layer, a
format the kernels lack, a tensor-parallel shard) returns None -- or has no such method -- and
the whole model then decodes with torch ops (``native_step.supports`` is False). So a new
weight format plugs in by offering a description, without touching the step.

Formats (``kind``), each y = x @ W^T for bfloat16 activations x (rows, in_features):

- ``"bf16"``: W (out, in) bfloat16, row-major (``nn.Linear``'s layout); ``kernels/linear.c``.
- ``"q8_0"``, ``"q4_0"``, ``"q4_1"``: GGUF blocks of 32 weights exactly as stored in the file
  (34, 18 and 20 bytes a block), each output row ``in / 32`` blocks. ``scales_ptr``: 0, or the
  same blocks packed for quant.c's GEMM kernel (``quant.pack``: 16 rows interleaved), which
  then runs instead of the stored-layout kernel (same arithmetic, ~3x fewer instructions);
  table lookups (a quantized embedding) read the stored blocks at ``weight_ptr``.
- ``"int8"``: W (out, in) int8 with one float32 scale per output row at ``scales_ptr``.

The quantized kinds run ``tf_qlinear_<kind>`` from ``kernels/quant.c`` (float32 sums); the
step adds ``bias_ptr`` -- always bfloat16 (out,), or 0 -- and rounds to bfloat16 once.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

# kind -> the code tf_linear_desc.kind carries (decode_layer.c's TF_KIND_*)
KIND_CODES = {"bf16": 0, "q8_0": 1, "q4_0": 2, "q4_1": 3, "int8": 4}
QUANT_BLOCK = 32
_BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}


def weight_bytes(kind: str, out_features: int, in_features: int) -> int:
    """Bytes of weight one pass over a linear of this kind reads (scales included)."""
    if kind == "bf16":
        return 2 * out_features * in_features
    if kind == "int8":
        return out_features * (in_features + 4)
    return out_features * (in_features // QUANT_BLOCK) * _BLOCK_BYTES[kind]


@dataclass(frozen=True)
class NativeLinear:
    """One linear layer as the native kernels see it (see the module docstring for kinds).
    Pointers are raw addresses (0 for none); ``owner`` holds whatever keeps that memory alive
    (the module or its tensors) for as long as the description is in use."""
    kind: str
    weight_ptr: int
    scales_ptr: int
    bias_ptr: int
    out_features: int
    in_features: int
    owner: object

    def __post_init__(self):
        if self.kind not in KIND_CODES:
            raise ValueError(f"unknown native linear kind {self.kind!r} "
                             f"(one of {', '.join(KIND_CODES)})")
        if self.out_features <= 0 or self.in_features <= 0 or self.in_features % QUANT_BLOCK:
            raise ValueError(f"native linear {self.kind} {self.out_features}x{self.in_features}: "
                             f"in_features must be a positive multiple of {QUANT_BLOCK}")
        if not self.weight_ptr:
            raise ValueError("native linear without a weight pointer")
        if self.kind == "int8" and not self.scales_ptr:
            raise ValueError("int8 native linear needs per-row scales")

    @property
    def weight_bytes(self) -> int:
        return weight_bytes(self.kind, self.out_features, self.in_features)


def native_linear_of(module: object) -> NativeLinear | None:
    """What ``module`` offers the native step: its ``native_linear()``, or None when it has
    no such method (a stock ``nn.Linear``) or declines."""
    offer = getattr(module, "native_linear", None)
    return offer() if callable(offer) else None


class LinearDesc(ctypes.Structure):
    """tf_linear_desc in decode_layer.c."""
    _fields_ = [("kind", ctypes.c_int64), ("weight", ctypes.c_void_p),
                ("scales", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("out", ctypes.c_int64), ("in_", ctypes.c_int64)]


def describe(linear: NativeLinear) -> LinearDesc:
    """The C descriptor of ``linear`` (the caller keeps ``linear.owner`` alive)."""
    return LinearDesc(kind=KIND_CODES[linear.kind], weight=linear.weight_ptr,
                      scales=linear.scales_ptr or None, bias=linear.bias_ptr or None,
                      out=linear.out_features, in_=linear.in_features)
