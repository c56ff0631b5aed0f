"""ctypes wrappers of ``quant.c``: weight-only quantized linears on GGUF blocks as stored.

The kernels are part of the one native library (``kernels/__init__.py`` builds every ``*.c``
here); :func:`library` is that library with these functions' signatures set, or None where
the native kernels are unavailable (callers then dequantize with torch/numpy instead).
:func:`build_standalone` compiles ``quant.c`` alone with other flags (tests use it to check
the portable scalar version on this machine).
"""
from __future__ import annotations

import ctypes
import functools
import subprocess
import tempfile
from pathlib import Path

import torch

from tokenfactory.model import kernels

# kind -> the C enum in quant.c
KINDS = {"q8_0": 0, "q4_0": 1, "q4_1": 2, "int8": 3}
BLOCK = 32                                          # values per block (every kind)
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}  # bytes per block (int8: 1 per value)


def row_bytes(kind: str, in_features: int) -> int:
    """Bytes of one stored weight row of ``in_features`` values."""
    if kind == "int8":
        return in_features
    return in_features // BLOCK * BLOCK_BYTES[kind]


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    for kind in KINDS:
        fn = getattr(lib, f"tf_qlinear_{kind}")
        fn.restype = None
        fn.argtypes = [ptr, ptr, ptr, ptr, i32, i32, i32]
    lib.tf_qlinear_exact.restype = None
    lib.tf_qlinear_exact.argtypes = [i32, ptr, ptr, ptr, ptr, i32, i32, i32]
    lib.tf_qlinear_isa.restype = i32
    lib.tf_qlinear_isa.argtypes = []
    lib.tf_qdequant_bf16.restype = None
    lib.tf_qdequant_bf16.argtypes = [i32, ptr, ptr, ptr, i32, i32, ptr]
    lib.tf_qpack.restype = i32
    lib.tf_qpack.argtypes = [i32, ptr, i32, i32, ptr]
    lib.tf_qgemm.restype = i32
    lib.tf_qgemm.argtypes = [i32, ptr, ptr, i32, i32, i32, ptr, ptr, ptr]
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The native library with the quantized kernels bound, or None (see
    ``kernels.unavailable_reason``)."""
    lib = kernels.library()
    if lib is None or not hasattr(lib, "tf_qgemm"):
        return None
    return _bind(lib)


def build_standalone(flags: list[str], out_dir: Path | None = None) -> ctypes.CDLL:
    """``quant.c`` compiled alone with ``flags`` (e.g. ``-march=x86-64`` for the scalar
    version) into ``out_dir`` (a fresh temporary directory if None) and loaded."""
    here = Path(__file__).parent
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="tf-quant-"))
    out = out_dir / "quant.so"
    proc = subprocess.run(["cc", *flags, "-fopenmp", "-shared", "-fPIC", "-std=c11", "-o",
                           str(out), str(here / "quant.c"), "-lm"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cc failed on quant.c: {proc.stderr.strip()[:500]}")
    return _bind(ctypes.CDLL(str(out)))


def _check(kind: str, weight: torch.Tensor, scales: torch.Tensor | None, in_features: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown quantized kind {kind!r} (one of {', '.join(KINDS)})")
    if in_features <= 0 or in_features % BLOCK:
        raise ValueError(f"in_features {in_features} is not a positive multiple of {BLOCK}")
    assert weight.dtype in (torch.uint8, torch.int8) and weight.is_contiguous()
    assert weight.dim() == 2 and weight.shape[1] == row_bytes(kind, in_features), \
        f"weight rows of {weight.shape[1]} bytes, expected {row_bytes(kind, in_features)}"
    if kind == "int8":
        assert scales is not None and scales.dtype == torch.float32 and scales.is_contiguous()
        assert scales.shape == (weight.shape[0],)


ISA_NAMES = {0: "portable C", 1: "AVX-512 BF16 (int8 dot products in portable C)",
             2: "AVX-512 VNNI + BF16"}


def isa(lib: ctypes.CDLL | None = None) -> str | None:
    """What the kernels were compiled for (``-march=native`` on this CPU), or None."""
    lib = lib or library()
    return None if lib is None else ISA_NAMES[lib.tf_qlinear_isa()]


def qlinear(kind: str, weight: torch.Tensor, scales: torch.Tensor | None, x: torch.Tensor,
            lib: ctypes.CDLL | None = None, exact: bool = False) -> torch.Tensor:
    """``x @ W^T`` as float32 (M, N) for bfloat16 x (M, K) and a quantized weight: ``weight``
    uint8 (N, row_bytes) blocks as stored; ``scales`` float32 (N,) for int8, else None.

    Default: the decode kernel, which rounds each block of 32 activations to int8 codes
    (scale amax / 127) and sums integer products (the native decode step runs the same one).
    ``exact``: the activations as given (bfloat16 products, float32 sums)."""
    lib = lib or library()
    assert lib is not None, kernels.unavailable_reason
    m, k = x.shape
    _check(kind, weight, scales, k)
    assert x.dtype == torch.bfloat16 and x.is_contiguous()
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=torch.float32)
    if m and n and exact:
        lib.tf_qlinear_exact(KINDS[kind], weight.data_ptr(),
                             None if scales is None else scales.data_ptr(),
                             x.data_ptr(), out.data_ptr(), m, n, k)
    elif m and n:
        getattr(lib, f"tf_qlinear_{kind}")(weight.data_ptr(),
                                           None if scales is None else scales.data_ptr(),
                                           x.data_ptr(), out.data_ptr(), m, n, k)
    return out


def dequantize_bf16(kind: str, weight: torch.Tensor, scales: torch.Tensor | None,
                    in_features: int, rows: torch.Tensor | None = None,
                    lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """Rows ``rows`` (int64 ids; all rows if None) of a quantized weight as bfloat16
    (n, in_features). Ids are the caller's to check (an embedding checks its vocabulary)."""
    lib = lib or library()
    assert lib is not None, kernels.unavailable_reason
    _check(kind, weight, scales, in_features)
    ids = None
    if rows is not None:
        ids = rows if rows.dtype == torch.int64 and rows.is_contiguous() else \
            rows.to(torch.int64).contiguous()
    n = weight.shape[0] if ids is None else ids.numel()
    out = torch.empty((n, in_features), dtype=torch.bfloat16)
    if n:
        lib.tf_qdequant_bf16(KINDS[kind], weight.data_ptr(),
                             None if scales is None else scales.data_ptr(),
                             None if ids is None else ids.data_ptr(), n, in_features,
                             out.data_ptr())
    return out


GEMM_KINDS = ("q8_0", "q4_0", "q4_1")   # what tf_qpack / tf_qgemm take
GEMM_ROWS = 16                         # output rows per packed group (out % 16 == 0)


def gemm_supported(kind: str, out_features: int, in_features: int,
                   lib: ctypes.CDLL | None = None) -> bool:
    """Whether :func:`qgemm` runs for this weight here (AVX-512 VNNI builds only)."""
    lib = lib or library()
    return (lib is not None and lib.tf_qlinear_isa() == 2 and kind in GEMM_KINDS
            and out_features % GEMM_ROWS == 0 and in_features % BLOCK == 0)


def pack(kind: str, weight: torch.Tensor, in_features: int,
         lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """The blocks of ``weight`` (uint8 (N, row_bytes) as stored) reordered for :func:`qgemm`:
    16 output rows interleaved 4 bytes at a time (quant.c, "Prefill GEMM"); the same bytes,
    uint8 (N / 16, 16 * row_bytes)."""
    lib = lib or library()
    assert lib is not None, kernels.unavailable_reason
    _check(kind, weight, None, in_features)
    n = weight.shape[0]
    if kind not in GEMM_KINDS or n % GEMM_ROWS:
        raise ValueError(f"cannot pack {kind} weight of {n} rows (kinds {GEMM_KINDS}, rows a "
                         f"multiple of {GEMM_ROWS})")
    out = torch.empty((n // GEMM_ROWS, GEMM_ROWS * weight.shape[1]), dtype=torch.uint8)
    rc = lib.tf_qpack(KINDS[kind], weight.data_ptr(), n, in_features, out.data_ptr())
    assert rc == 0, f"tf_qpack refused {kind} {tuple(weight.shape)}"
    return out


def qgemm(kind: str, packed: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None,
          float_output: bool = False, lib: ctypes.CDLL | None = None) -> torch.Tensor | None:
    """``x @ W^T (+ bias)`` for bfloat16 x (M, K) and W packed by :func:`pack` (N rows), as
    bfloat16 (M, N) (float32 with ``float_output``); activations rounded to int8 per block as
    the decode kernel rounds them. None where the kernel declines (no AVX-512 VNNI build, or
    out of memory): the caller then takes another path."""
    lib = lib or library()
    assert lib is not None, kernels.unavailable_reason
    m, k = x.shape
    assert x.dtype == torch.bfloat16 and x.is_contiguous()
    n = packed.shape[0] * GEMM_ROWS
    assert packed.dtype == torch.uint8 and packed.is_contiguous()
    assert packed.shape[1] == GEMM_ROWS * row_bytes(kind, k), "packed for another in_features"
    if bias is not None:
        assert bias.shape == (n,)
        bias = bias.to(torch.bfloat16).contiguous()
    out = torch.empty((m, n), dtype=torch.float32 if float_output else torch.bfloat16)
    if m == 0:
        return out
    rc = lib.tf_qgemm(KINDS[kind], packed.data_ptr(), x.data_ptr(), m, n, k,
                      None if bias is None else bias.data_ptr(),
                      None if float_output else out.data_ptr(),
                      out.data_ptr() if float_output else None)
    return out if rc == 0 else None
