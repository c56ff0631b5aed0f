"""ctypes wrapper of ``attention_int8.c``: decode attention reading int8 KV pages directly.

The kernel is part of the one native library (``kernels/__init__.py`` builds every ``*.c``
here); :func:`library` is that library with its signature set, or None where the native
kernels are unavailable (``layers.paged_attention`` then gathers and dequantizes pages in
torch). The page format (D int8 codes + a float32 scale per token row) is ``kv_pages.py``'s.
Where the build has AVX-512 VNNI the kernel scores keys with int8 dot products, rounding each
query head's row to int8 first (:func:`int8_dot`); ``int8_dot=False`` keeps float32 scores.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from tokenfactory.model import kernels


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, i32, ptr, f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    lib.tf_kv8_decode_attention.restype = i32
    lib.tf_kv8_decode_attention.argtypes = [ptr, i64, ptr, ptr, i64, i32, ptr, i64, i64, ptr,
                                            i32, i32, i32, i32, i32, f32, ptr, i64, i32]
    lib.tf_kv8_supported.restype = i32
    lib.tf_kv8_supported.argtypes = [i32]
    lib.tf_kv8_int8_dot.restype = i32
    lib.tf_kv8_int8_dot.argtypes = []
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The native library with the int8 attention kernel bound, or None (see
    ``kernels.unavailable_reason``)."""
    lib = kernels.library()
    if lib is None or not hasattr(lib, "tf_kv8_int8_dot"):
        return None
    return _bind(lib)


def int8_dot() -> bool:
    """Whether the kernel scores keys with AVX-512 VNNI int8 dot products (this build has
    VNNI): q (times the softmax scale) is then rounded to int8 per (row, head) with scale
    absmax / 127, so scores carry that rounding on top of the pages' own."""
    lib = library()
    return lib is not None and bool(lib.tf_kv8_int8_dot())


def supports(q: torch.Tensor) -> bool:
    """Whether decode attention for queries like ``q`` (b, H, D) runs in the native kernel:
    bfloat16 on the CPU, D a multiple of 16 up to 256, library built."""
    head_dim = q.shape[-1]
    return (q.dtype == torch.bfloat16 and q.device.type == "cpu" and head_dim % 16 == 0
            and 0 < head_dim <= 256 and library() is not None)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, positions: torch.Tensor, window: int | None,
                     scale: float, out: torch.Tensor, int8_dot: bool = True) -> None:
    """One new token per sequence: q (b, H, D) bfloat16 at ``positions`` (b,) attends to keys
    [0, position] read through ``block_tables`` (b, pages) from int8 caches (Hkv, N, bs,
    D + 4), into ``out`` (b, H, D) bfloat16. The new tokens' K/V must already be written.
    ``int8_dot=False`` scores in float32 even where the VNNI path exists (tests, A/B)."""
    lib = library()
    assert lib is not None, kernels.unavailable_reason
    b, num_heads, head_dim = q.shape
    num_kv, num_blocks, bs, row = k_cache.shape
    assert k_cache.dtype == v_cache.dtype == torch.int8 and k_cache.shape == v_cache.shape
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and row == head_dim + 4
    assert q.dtype == out.dtype == torch.bfloat16 and q.shape == out.shape
    assert q.stride(2) == 1 and q.stride(1) == head_dim and out.stride(2) == 1 \
        and out.stride(1) == head_dim, "q and out rows must be contiguous (H, D) blocks"
    tables = block_tables if block_tables.dtype == torch.int64 and block_tables.stride(1) == 1 \
        else block_tables.to(torch.int64).contiguous()
    pos = positions if positions.dtype == torch.int64 and positions.is_contiguous() \
        else positions.to(torch.int64).contiguous()
    assert tables.shape[0] == b and pos.shape == (b,)
    rc = lib.tf_kv8_decode_attention(q.data_ptr(), q.stride(0), k_cache.data_ptr(),
                                     v_cache.data_ptr(), num_blocks, bs, tables.data_ptr(),
                                     tables.stride(0), tables.shape[1], pos.data_ptr(), b,
                                     num_heads, num_kv, head_dim, window or 0, scale,
                                     out.data_ptr(), out.stride(0), int(int8_dot))
    if rc != 0:
        why = {-3: "a position lies past its block table", -2: "out of memory"}.get(
            rc, "unsupported shapes")
        raise ValueError(f"int8 decode attention failed: {why} (q={tuple(q.shape)}, "
                         f"cache={tuple(k_cache.shape)}, tables={tuple(tables.shape)})")
