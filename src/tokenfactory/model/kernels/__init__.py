"""Native CPU kernels, compiled on first use with the system C compiler.

For CPUs with AVX-512 BF16 (see the comment at the top of each file for why it exists):
``attention.c`` holds bfloat16 prefill and decode attention over the paged KV cache,
``linear.c`` a small-batch bfloat16 linear layer that runs at memory bandwidth, and
``decode_layer.c`` a whole decode step for a batch of single-token decodes built from the two.
Every ``*.c`` file in this directory is built into the one library (a new kernel file joins it
by being here), once per source version and machine, in
``~/.cache/tokenfactory/kernels/`` (override with TOKENFACTORY_CACHE) with
``cc -O3 -march=native -fopenmp``, and loaded with ctypes; calls release the GIL.

Everything here is optional: no compiler, a CPU without AVX-512 BF16, a failed build, or
TOKENFACTORY_NATIVE_KERNELS=0 make :func:`library` return None, and the model falls back to
torch (scaled_dot_product_attention, oneDNN linear layers). The reason is kept in
:data:`unavailable_reason`.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from tokenfactory.model.linear_kernels import KIND_CODES, LinearDesc

log = logging.getLogger(__name__)

_DIR = Path(__file__).parent
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
unavailable_reason: str | None = None


def _cpu_has_avx512_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags and "avx512f" in flags


def _cache_dir() -> Path:
    base = Path(os.environ.get("TOKENFACTORY_CACHE", Path.home() / ".cache" / "tokenfactory"))
    return base / "kernels"


def _sources() -> tuple[list[Path], list[Path]]:
    """Every ``*.c`` and ``*.h`` file beside this one, sorted so the cache key is stable: a
    kernel file added here (e.g. quant.c) joins the library without touching this module."""
    return sorted(_DIR.glob("*.c")), sorted(_DIR.glob("*.h"))


def _build(compiler: str) -> Path:
    sources, headers = _sources()
    # the key covers each file's name and content, so any edit (or a new file) rebuilds
    source = b"".join(path.name.encode() + b"\0" + path.read_bytes() + b"\0"
                      for path in (*sources, *headers))
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("flags")), "")
    key = hashlib.sha256(source + " ".join(_FLAGS).encode() + version.encode() + cpu.encode())
    out = _cache_dir() / f"kernels-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        proc = subprocess.run([compiler, *_FLAGS, "-o", str(tmp_out), *map(str, sources), "-lm"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed on the kernels: {proc.stderr.strip()[:500]}")
        os.replace(tmp_out, out)   # atomic: concurrent builders each produce a whole file
    return out


def _load() -> ctypes.CDLL | None:
    global unavailable_reason
    if os.environ.get("TOKENFACTORY_NATIVE_KERNELS", "1") == "0":
        unavailable_reason = "disabled by TOKENFACTORY_NATIVE_KERNELS=0"
        return None
    if not _cpu_has_avx512_bf16():
        unavailable_reason = "CPU has no AVX-512 BF16"
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        unavailable_reason = "no C compiler (cc/gcc) on PATH"
        return None
    try:
        path = _build(compiler)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError) as exc:
        unavailable_reason = f"native kernels not built: {exc}"
        log.warning("%s; using torch kernels", unavailable_reason)
        return None
    i64, i32, ptr, f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    lib.tf_prefill_attention.restype = i32
    lib.tf_prefill_attention.argtypes = [ptr, i64, ptr, ptr, i64, i32, ptr, i32, i32,
                                         i32, i32, i32, i32, f32, ptr, i64, ptr, ptr]
    lib.tf_decode_attention.restype = i32
    lib.tf_decode_attention.argtypes = [ptr, i64, ptr, ptr, i64, i32, ptr, i64, i64, ptr, i32,
                                        i32, i32, i32, i32, f32, ptr, i64]
    lib.tf_attention_supported.restype = i32
    lib.tf_attention_supported.argtypes = [i32]
    lib.tf_linear.restype = i32
    lib.tf_linear.argtypes = [ptr, i64, i32, ptr, i32, i32, ptr, ptr, i64]
    lib.tf_linear_f32.restype = i32
    lib.tf_linear_f32.argtypes = [ptr, i64, i32, ptr, i32, i32, ptr, i64]
    lib.tf_linear_supported.restype = i32
    lib.tf_linear_supported.argtypes = [i32]
    lib.tf_add_rms_norm.restype = i32
    lib.tf_add_rms_norm.argtypes = [ptr, i64, ptr, i64, i32, i32, ptr, f32, ptr, i64]
    lib.tf_rope_rows.restype = i32
    lib.tf_rope_rows.argtypes = [ptr, i64, i32, i32, i32, ptr, ptr]
    lib.tf_decode_step.restype = i32
    lib.tf_decode_step.argtypes = [ptr, i32, ptr, i32, ptr, ptr, ptr, ptr, ptr, ptr, ptr,
                                   ptr, ptr, ptr, i64, i64, ptr, ptr, ptr, ptr]
    lib.tf_linear_kind_supported.restype = i32
    lib.tf_linear_kind_supported.argtypes = [i32]
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first call; None when unavailable."""
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                _lib = _load()
                _tried = True
    return _lib


KEY_BLOCK = 64   # keys per block in attention.c (KB): packed K/V are padded to a multiple


def _checked(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             out: torch.Tensor) -> ctypes.CDLL:
    """The library, after the layout checks both kernels rely on: bfloat16 throughout, q and
    out (tokens, H, D) with rows of H contiguous D-vectors, contiguous caches."""
    lib = library()
    assert lib is not None, unavailable_reason
    head_dim = q.shape[2]
    assert q.stride(2) == 1 and q.stride(1) == head_dim and out.stride(2) == 1 and out.stride(1) == head_dim
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert q.dtype == k_cache.dtype == out.dtype == torch.bfloat16
    return lib


def _int64_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as int64 with a unit stride along its last dimension (as the C code indexes it),
    copying only when it is not already so."""
    return t if t.dtype == torch.int64 and t.stride(-1) == 1 else t.to(torch.int64).contiguous()


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_ids: torch.Tensor, start: int, window: int | None, scale: float,
                      out: torch.Tensor, workspace: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Causal attention of the chunk ``q`` (n, H, D) at positions start .. start + n - 1 over
    keys [0, start + n) read through ``block_ids`` from (Hkv, N, bs, D) caches, into ``out``
    (n, H, D). All bfloat16; the chunk's own K/V must already be in the cache. ``workspace``:
    two flat bfloat16 buffers of at least Hkv * round_up(start + n, 64) * D elements."""
    lib = _checked(q, k_cache, v_cache, out)
    n, num_heads, head_dim = q.shape
    num_kv, num_blocks, bs, _ = k_cache.shape
    table = _int64_rows(block_ids)
    if table.numel() * bs < start + n:   # the kernel would read past the table
        raise ValueError(f"block table of {table.numel()} pages cannot hold {start + n} positions")
    size = workspace_numel(num_kv, start + n, head_dim)
    if workspace is None:
        workspace = (torch.empty(size, dtype=torch.bfloat16), torch.empty(size, dtype=torch.bfloat16))
    kp, vp = workspace
    assert kp.numel() >= size and vp.numel() >= size
    rc = lib.tf_prefill_attention(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                                  num_blocks, bs, table.data_ptr(), n, start, num_heads, num_kv,
                                  head_dim, window or 0, scale, out.data_ptr(), out.stride(0),
                                  kp.data_ptr(), vp.data_ptr())
    if rc != 0:
        raise ValueError(f"native attention rejected shapes q={tuple(q.shape)} cache={tuple(k_cache.shape)}")


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, positions: torch.Tensor, window: int | None,
                     scale: float, out: torch.Tensor) -> None:
    """One new token per row: q (b, H, D) at ``positions`` (b,) attends to keys
    [0, position] read through ``block_tables`` (b, pages) from (Hkv, N, bs, D) caches, into
    ``out`` (b, H, D). All bfloat16; the new tokens' K/V must already be in the cache. Rows
    that continue the row before them (next position, same pages) -- a token and its drafts --
    read their pages together; every row's result is bit for bit what it is alone."""
    lib = _checked(q, k_cache, v_cache, out)
    b, num_heads, head_dim = q.shape
    num_kv, num_blocks, bs, _ = k_cache.shape
    tables, pos = _int64_rows(block_tables), _int64_rows(positions)
    assert tables.shape[0] == b and pos.shape == (b,)
    rc = lib.tf_decode_attention(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                                 num_blocks, bs, tables.data_ptr(), tables.stride(0),
                                 tables.shape[1], pos.data_ptr(), b, num_heads, num_kv, head_dim,
                                 window or 0, scale, out.data_ptr(), out.stride(0))
    if rc != 0:
        why = "a position lies past its block table" if rc == -3 else "unsupported shapes"
        raise ValueError(f"native decode attention failed: {why} (q={tuple(q.shape)}, "
                         f"cache={tuple(k_cache.shape)}, tables={tuple(tables.shape)})")


def workspace_numel(num_kv: int, num_keys: int, head_dim: int) -> int:
    return num_kv * ((num_keys + KEY_BLOCK - 1) // KEY_BLOCK * KEY_BLOCK) * head_dim


def supports(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the attention kernels can run these shapes here (builds the library once)."""
    if dtype != torch.bfloat16 or head_dim % 64 != 0 or head_dim > 256:
        return False
    return library() is not None


# Up to this many activation rows the native linear kernel beats oneDNN (it reads each weight
# row once; 4+ rows run register tiles, see linear.c); beyond, oneDNN's blocked GEMM wins.
# Measured on the 2-core Zen 4 over a 100M model's layers (ms for all of them, plain weights
# on huge pages; oneDNN with pre-packed weights), before the tiles: M=1 5.4 vs 11.1, M=4 6.0
# vs 10.5, M=8 9.2 vs 12.1, M=16 18.2 vs 13.8. Also the native decode step's row limit, so the
# most rows one request's drafts can take (scheduler ``max_speculative_rows``).
LINEAR_MAX_ROWS = 8


def supports_linear(dtype: torch.dtype, in_features: int) -> bool:
    """Whether :func:`linear` can run a layer with this dtype and input width here."""
    return dtype == torch.bfloat16 and in_features % 32 == 0 and library() is not None


def _linear_operands(x: torch.Tensor, weight: torch.Tensor) -> tuple[ctypes.CDLL, int, int, int]:
    """The library and (M, N, K) of a native linear, after checking the operands' layout."""
    lib = library()
    assert lib is not None, unavailable_reason
    m, k = x.shape
    assert x.stride(1) == 1 and weight.is_contiguous() and weight.shape[1] == k
    assert x.dtype == weight.dtype == torch.bfloat16
    return lib, m, weight.shape[0], k


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for bfloat16 x (M, K) (rows may be strided), weight (N, K)
    contiguous, bias (N,) or None; into ``out`` (M, N) if given. Meant for small M
    (:data:`LINEAR_MAX_ROWS`); correct for any."""
    lib, m, n, k = _linear_operands(x, weight)
    if bias is not None:
        assert bias.is_contiguous() and bias.dtype == torch.bfloat16 and bias.shape == (n,)
    if out is None:
        out = x.new_empty((m, n))
    assert out.stride(1) == 1 and out.shape == (m, n) and out.dtype == torch.bfloat16
    rc = lib.tf_linear(x.data_ptr(), x.stride(0), m, weight.data_ptr(), n, k,
                       None if bias is None else bias.data_ptr(), out.data_ptr(), out.stride(0))
    if rc != 0:
        raise ValueError(f"native linear rejected shapes x={tuple(x.shape)} "
                         f"weight={tuple(weight.shape)}")
    return out


def linear_f32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` as float32 (M, N) for bfloat16 x (M, K) and weight (N, K), summed in
    float32 and not rounded to bfloat16 (logits: see linear.c)."""
    lib, m, n, k = _linear_operands(x, weight)
    out = torch.empty((m, n), dtype=torch.float32)
    if lib.tf_linear_f32(x.data_ptr(), x.stride(0), m, weight.data_ptr(), n, k,
                         out.data_ptr(), out.stride(0)) != 0:
        raise ValueError(f"native linear rejected shapes x={tuple(x.shape)} "
                         f"weight={tuple(weight.shape)}")
    return out


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """``x += delta`` in place (bfloat16 sums; skipped when delta is None), then return
    RMSNorm(x) * weight (M, H): the residual add and the next norm in one call. bfloat16
    (M, H) tensors with unit stride along H; weight (H,) contiguous."""
    lib = library()
    assert lib is not None, unavailable_reason
    m, h = x.shape
    assert x.dtype == weight.dtype == torch.bfloat16 and x.stride(1) == 1
    assert weight.is_contiguous() and weight.shape == (h,)
    if delta is not None:
        assert delta.shape == (m, h) and delta.dtype == torch.bfloat16 and delta.stride(1) == 1
    out = x.new_empty((m, h))
    lib.tf_add_rms_norm(x.data_ptr(), x.stride(0), None if delta is None else delta.data_ptr(),
                        0 if delta is None else delta.stride(0), m, h, weight.data_ptr(), eps,
                        out.data_ptr(), out.stride(0))
    return out


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in place on bfloat16 x (T, heads, D) (heads of D contiguous, any row stride) with
    cos/sin (T, D) from ``RotaryEmbedding.cos_sin`` (sin's first half negated); returns x."""
    lib = library()
    assert lib is not None, unavailable_reason
    t, heads, d = x.shape
    assert x.dtype == cos.dtype == sin.dtype == torch.bfloat16
    assert x.stride(2) == 1 and x.stride(1) == d
    assert cos.is_contiguous() and sin.is_contiguous() and cos.shape == sin.shape == (t, d)
    if lib.tf_rope_rows(x.data_ptr(), x.stride(0), t, heads, d, cos.data_ptr(),
                        sin.data_ptr()) != 0:
        raise ValueError(f"native RoPE rejected head size {d}")
    return x


def linear_kind_supported(kind: str) -> bool:
    """Whether the library runs linears of this kind (linear_kernels.KIND_CODES): bf16
    always; a quantized kind once kernels/quant.c provides its kernel."""
    lib = library()
    return lib is not None and kind in KIND_CODES and bool(
        lib.tf_linear_kind_supported(KIND_CODES[kind]))


class LayerWeights(ctypes.Structure):
    """tf_layer in decode_layer.c: one decoder layer as its modules offer it (norm weights,
    NULL where absent; a linear descriptor per projection; the KV pages)."""
    _fields_ = [(name, ctypes.c_void_p) for name in (
        "input_norm", "q_norm", "k_norm", "post_norm")] + [
        (name, LinearDesc) for name in ("qkv", "o", "gate_up", "down")] + [
        ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p), ("window", ctypes.c_int64)]


class LayerDims(ctypes.Structure):
    """tf_dims in decode_layer.c."""
    _fields_ = [(name, ctypes.c_int64) for name in (
        "hidden", "heads", "kv_heads", "head_dim", "intermediate", "num_blocks", "block_size")] + [
        ("eps", ctypes.c_float), ("scale", ctypes.c_float)]


def decode_layer_workspace(batch: int, dims: LayerDims) -> int:
    """bfloat16 elements of scratch :func:`decode_step` needs for ``batch`` rows."""
    qkv = (dims.heads + 2 * dims.kv_heads) * dims.head_dim
    return batch * (2 * dims.hidden + qkv + dims.heads * dims.head_dim + 3 * dims.intermediate)


def decode_step(layers: ctypes.Array, dims: LayerDims, ids: torch.Tensor, embed: ctypes.Structure,
                final_norm: int, lm_head: ctypes.Structure, x: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor, rope_rows: torch.Tensor,
                slots: torch.Tensor, tables: torch.Tensor, positions: torch.Tensor,
                work: torch.Tensor, fwork: torch.Tensor, logits: torch.Tensor) -> None:
    """One decode step in one call (decode_layer.c): B = len(ids) single-token decodes at
    ``positions`` (B,) whose K/V go to the flat cache ``slots`` (B,), attending through
    ``tables`` (B, pages); embedding, every layer, final norm and ``lm_head`` (both
    ``linear_kernels.LinearDesc``; ``final_norm`` the address of its bfloat16 weight) into
    float32 ``logits`` (B, vocab). RoPE from rows
    ``rope_rows`` (B,) of the bfloat16 tables ``cos``/``sin``; ``x`` (B, hidden), ``work``
    (:func:`decode_layer_workspace` bfloat16 elements) and ``fwork`` (float32, B x the widest
    quantized linear) are scratch. The caller guarantees dtypes and contiguity (checked once when it
    builds ``layers``); the kernel checks the rest."""
    b = ids.shape[0]
    rc = _lib.tf_decode_step(layers, len(layers), ctypes.addressof(dims), b, ids.data_ptr(),
                             ctypes.addressof(embed), final_norm,
                             ctypes.addressof(lm_head), x.data_ptr(), cos.data_ptr(),
                             sin.data_ptr(), rope_rows.data_ptr(), slots.data_ptr(),
                             tables.data_ptr(), tables.stride(0), tables.shape[1],
                             positions.data_ptr(), work.data_ptr(), fwork.data_ptr(),
                             logits.data_ptr())
    if rc != 0:
        why = {-1: "unsupported shapes or a token id outside the vocabulary", -2: "out of memory",
               -3: "a position lies past its block table"}[rc]
        raise ValueError(f"native decode step failed: {why}")
