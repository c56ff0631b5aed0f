"""Load a GGUF file (llama.cpp's format) into :class:`LlamaForCausalLM`.

The file is read with the ``gguf`` package (llama.cpp's own reader): it memory-maps the file and
exposes every tensor as a numpy view of its raw bytes. Tensors are dequantized a slice of rows
at a time (``gguf.quants.dequantize``, float32, at most ~16 MB) straight into the model's
storage in the serving dtype, so no whole float copy of a tensor is ever made.

Three things differ from a Hugging Face checkpoint:

* dimensions are stored fastest-first (ggml's ``ne`` order): a weight of ``ne = [in, out]`` is
  the row-major matrix ``(out, in)`` that ``nn.Linear`` holds;
* llama.cpp's converter reorders the rows of each head of the q and k projections for the
  llama-architecture family (llama, mistral): Hugging Face rotates pairs ``(i, i + D/2)``,
  ggml's "normal" RoPE rotates neighbours ``(2i, 2i + 1)``, so row ``j * D/2 + i`` of a head
  (``j`` in {0, 1}) was moved to ``2 i + j``. Our RoPE is the Hugging Face one, so the loader
  moves the rows back (qwen2/qwen3 use ggml's "neox" RoPE, which is the HF layout: untouched);
* the config is metadata inside the file (``{arch}.block_count`` and friends).

Every failure a user can cause becomes a one-line :class:`ModelLoadError` naming the file.
"""
from __future__ import annotations

import functools
import logging
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenfactory.model.config import ARCHITECTURES, ModelConfig, ModelLoadError, RopeConfig

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"

# general.architecture -> our architecture name (config.ARCHITECTURES)
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                      "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# architectures whose q/k rows llama.cpp's converter permutes per head (see module docstring)
_PERMUTED_QK = {"llama", "mistral"}
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K",
                   "Q6_K")


def is_gguf_file(path: str | Path) -> bool:
    """True if ``path`` is a regular file starting with the GGUF magic (whatever its name)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:   # missing, a directory, unreadable
        return False


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


@dataclass
class GGUFFile:
    """An opened GGUF file: the ``gguf`` reader plus lookups that raise one-line errors."""
    path: Path
    reader: Any                       # gguf.GGUFReader
    tensors: dict[str, Any]           # name -> gguf ReaderTensor (data: memory-mapped view)

    @property
    def arch(self) -> str:
        return str(self.value("general.architecture"))

    def value(self, key: str, default: Any = ...) -> Any:
        """A scalar or string metadata value; ``default`` if absent (error if not given)."""
        field = self.reader.fields.get(key)
        if field is None:
            if default is ...:
                raise ModelLoadError(f"{self.path}: missing metadata key {key!r}")
            return default
        try:
            return field.contents()
        except Exception as exc:   # malformed value bytes
            raise ModelLoadError(f"{self.path}: cannot read metadata key {key!r} "
                                 f"({_one_line(exc)})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape in torch (row-major) order: ggml's ``ne`` reversed."""
        return tuple(int(n) for n in reversed(self.tensors[name].shape.tolist()))


@functools.cache
def _reader_class() -> type:
    import gguf  # imported on first use: HF-directory users never pay for it

    class PlainViewReader(gguf.GGUFReader):
        """GGUFReader over a plain ndarray view of its memory map. The stock reader slices an
        ``np.memmap`` ~10^6 times while parsing the vocabulary arrays, and every memmap slice
        runs ``memmap.__array_finalize__``: viewing the same mapping as an ndarray (still
        memory-mapped, nothing copied) parses the 135M file ~3x faster (2.1 -> 0.7 s) and
        dequantizes it ~1.7x faster."""

        def __setattr__(self, name: str, value: Any) -> None:
            if name == "data" and isinstance(value, np.memmap):
                value = value.view(np.ndarray)
            super().__setattr__(name, value)

    return PlainViewReader


def open_gguf(path: str | Path) -> GGUFFile:
    """Memory-map and parse a GGUF file; raises :class:`ModelLoadError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: GGUF file not found")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a file")
    if not is_gguf_file(path):
        raise ModelLoadError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
    try:
        reader = _reader_class()(path)
    except Exception as exc:   # the reader indexes past the end of a truncated map, etc.
        raise ModelLoadError(f"{path}: truncated or corrupt GGUF file ({_one_line(exc)})") from None
    return GGUFFile(path, reader, {t.name: t for t in reader.tensors})


def _rope_config(gf: GGUFFile, arch: str, max_pos: int) -> RopeConfig:
    theta = float(gf.value(f"{arch}.rope.freq_base", 10000.0))
    kind = str(gf.value(f"{arch}.rope.scaling.type", "none"))
    factor = gf.value(f"{arch}.rope.scaling.factor", None)
    if factor is None:
        factor = gf.value(f"{arch}.rope.scale_linear", None)   # older files
        if factor is not None and kind == "none":
            kind = "linear"
    if kind == "none" or (kind == "linear" and float(factor or 1.0) == 1.0):
        return RopeConfig(theta=theta)
    if kind not in ("linear", "yarn"):
        raise ModelLoadError(f"{gf.path}: unsupported RoPE scaling type {kind!r} "
                             "(supported: none, linear, yarn)")
    if factor is None:
        raise ModelLoadError(f"{gf.path}: RoPE scaling {kind!r} without "
                             f"{arch}.rope.scaling.factor")
    if kind == "linear":
        return RopeConfig(rope_type="linear", theta=theta, factor=float(factor))
    orig = gf.value(f"{arch}.rope.scaling.original_context_length", max_pos)
    attn = gf.value(f"{arch}.rope.scaling.attn_factor", None)
    return RopeConfig(rope_type="yarn", theta=theta, factor=float(factor),
                      original_max_position_embeddings=int(orig),
                      beta_fast=float(gf.value(f"{arch}.rope.scaling.yarn_beta_fast", 32.0)),
                      beta_slow=float(gf.value(f"{arch}.rope.scaling.yarn_beta_slow", 1.0)),
                      attention_factor=None if attn is None else float(attn))


def load_gguf_config(source: str | Path | GGUFFile) -> ModelConfig:
    """Build a :class:`ModelConfig` from a GGUF file's metadata (and, where the metadata is
    silent, from which tensors exist: vocabulary size, tied embeddings, biases)."""
    gf = source if isinstance(source, GGUFFile) else open_gguf(source)
    try:
        return _build_config(gf)
    except (TypeError, ValueError, OverflowError) as exc:   # ModelLoadError passes through
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"{gf.path}: bad metadata value ({_one_line(exc)})") from None


def _build_config(gf: GGUFFile) -> ModelConfig:
    arch = gf.arch
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(f"{gf.path}: unsupported architecture {arch!r} (general.architecture;"
                             f" supported: {', '.join(GGUF_ARCHITECTURES)})")
    name = GGUF_ARCHITECTURES[arch]

    def need(key: str) -> int:
        return int(gf.value(f"{arch}.{key}"))

    hidden, heads, layers = need("embedding_length"), need("attention.head_count"), \
        need("block_count")
    kv_heads = int(gf.value(f"{arch}.attention.head_count_kv", heads))
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        raise ModelLoadError(f"{gf.path}: attention.head_count ({heads}) is not a positive "
                             f"multiple of attention.head_count_kv ({kv_heads})")
    head_dim = int(gf.value(f"{arch}.attention.key_length", hidden // heads))
    rope_dim = int(gf.value(f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ModelLoadError(f"{gf.path}: partial rotary embeddings (rope.dimension_count "
                             f"{rope_dim} != head size {head_dim}) are not supported")
    if "token_embd.weight" not in gf.tensors:
        raise ModelLoadError(f"{gf.path}: tensor 'token_embd.weight' is missing")
    vocab = gf.shape("token_embd.weight")[0]
    max_pos = int(gf.value(f"{arch}.context_length", 2048))
    window = gf.value(f"{arch}.attention.sliding_window", None)
    defaults = ARCHITECTURES[name]
    bias = "blk.0.attn_q.bias" in gf.tensors
    qkv_bias = bias if defaults["qkv_bias"] is None else defaults["qkv_bias"]
    return ModelConfig(
        architecture=name, hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim,
        intermediate_size=need("feed_forward_length"), vocab_size=vocab,
        rms_norm_eps=float(gf.value(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=max_pos,
        tie_word_embeddings="output.weight" not in gf.tensors,
        qkv_bias=qkv_bias, o_bias="blk.0.attn_output.bias" in gf.tensors,
        mlp_bias="blk.0.ffn_up.bias" in gf.tensors,
        qk_norm=defaults["qk_norm"] or "blk.0.attn_q_norm.weight" in gf.tensors,
        rope=_rope_config(gf, arch, max_pos),
        sliding_windows=[int(window) if window else None] * layers,
        # dequantized weights are served in bfloat16 unless asked otherwise
        torch_dtype="bfloat16", hidden_act="silu")


@dataclass
class _Part:
    """One GGUF tensor forming ``rows`` rows of a (possibly fused) parameter."""
    name: str
    rows: int
    permute_heads: int = 0   # > 0: undo llama.cpp's per-head q/k row order over this many heads


def gguf_tensor_names(cfg: ModelConfig, arch: str) -> dict[str, list[_Part]]:
    """Our parameter name -> the GGUF tensors concatenated (dim 0) to form it."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    permute = arch in _PERMUTED_QK
    qh, kh = (cfg.num_heads, cfg.num_kv_heads) if permute else (0, 0)
    names = {"embed_tokens.weight": [_Part("token_embd.weight", cfg.vocab_size)],
             "norm.weight": [_Part("output_norm.weight", h)]}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = [_Part("output.weight", cfg.vocab_size)]
    for i in range(cfg.num_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        for kind in ("weight",) + (("bias",) if cfg.qkv_bias else ()):
            names[p + f"self_attn.qkv_proj.{kind}"] = [
                _Part(b + f"attn_q.{kind}", q_rows, qh), _Part(b + f"attn_k.{kind}", kv_rows, kh),
                _Part(b + f"attn_v.{kind}", kv_rows)]
        names[p + "self_attn.o_proj.weight"] = [_Part(b + "attn_output.weight", h)]
        if cfg.o_bias:
            names[p + "self_attn.o_proj.bias"] = [_Part(b + "attn_output.bias", h)]
        if cfg.qk_norm:
            names[p + "self_attn.q_norm.weight"] = [_Part(b + "attn_q_norm.weight", cfg.head_dim)]
            names[p + "self_attn.k_norm.weight"] = [_Part(b + "attn_k_norm.weight", cfg.head_dim)]
        for kind in ("weight",) + (("bias",) if cfg.mlp_bias else ()):
            names[p + f"mlp.gate_up_proj.{kind}"] = [_Part(b + f"ffn_gate.{kind}", inter),
                                                      _Part(b + f"ffn_up.{kind}", inter)]
            names[p + f"mlp.down_proj.{kind}"] = [_Part(b + f"ffn_down.{kind}", h)]
        names[p + "input_layernorm.weight"] = [_Part(b + "attn_norm.weight", h)]
        names[p + "post_attention_layernorm.weight"] = [_Part(b + "ffn_norm.weight", h)]
    return names


def dequantize(gf: GGUFFile, name: str, rows: slice = slice(None)) -> np.ndarray:
    """Rows ``rows`` of the tensor as float32, in torch (row-major) shape. F32 tensors come
    back as a read-only view of the map; everything else is a fresh array."""
    import gguf

    t = gf.tensors[name]
    shape = gf.shape(name)
    data = t.data[rows] if len(shape) == 2 else t.data   # 2-D: rows of whole blocks
    try:
        out = gguf.quants.dequantize(data, t.tensor_type)
    except Exception as exc:   # e.g. I/O errors reading the map
        raise ModelLoadError(f"{gf.path}: cannot dequantize tensor {name!r} "
                             f"({_one_line(exc)})") from None
    return out.reshape((-1,) + shape[1:]) if len(shape) == 2 else out.reshape(shape)


_TORCH_VIEWABLE = {"F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16),
                   "BF16": (np.int16, torch.bfloat16)}


def _torch_view(gf: GGUFFile, name: str, rows: slice) -> torch.Tensor | None:
    """Rows of an F32/F16/BF16 tensor as a torch view of the map (no float32 copy: the cast
    happens in the final copy: f16 -> bf16 ran ~2x faster than through numpy); None for
    block-quantized types. Read-only memory: the view is only ever read."""
    t = gf.tensors[name]
    kind = _TORCH_VIEWABLE.get(t.tensor_type.name)
    if kind is None:
        return None
    shape = gf.shape(name)
    data = (t.data[rows] if len(shape) == 2 else t.data).view(kind[0])
    with warnings.catch_warnings():   # "the given NumPy array is not writable"
        warnings.simplefilter("ignore", UserWarning)
        view = torch.from_numpy(data)
    return view.view(kind[1]).reshape((-1,) + shape[1:] if len(shape) == 2 else shape)


def copy_unpermuted(dst: torch.Tensor, src: torch.Tensor, heads: int) -> None:
    """``dst.copy_(src)`` undoing llama.cpp's q/k row order: within each head, ggml row
    ``2 i + j`` holds HF row ``j * D/2 + i``. Written through views, so no permuted temporary
    is made. ``dst`` (contiguous), ``src``: (heads * D, ...) or (heads * D,) for a bias."""
    rest = tuple(src.shape[1:])
    d_half = src.shape[0] // heads // 2
    dst.view(heads, 2, d_half, *rest).copy_(src.view(heads, d_half, 2, *rest).transpose(1, 2))


def _check_tensors(gf: GGUFFile, names: dict[str, list[_Part]],
                   params: dict[str, torch.nn.Parameter]) -> None:
    """Every tensor present, of a supported type and of the expected shape, before any work."""
    for ours, parts in names.items():
        tail = tuple(params[ours].shape[1:])
        for part in parts:
            t = gf.tensors.get(part.name)
            if t is None:
                raise ModelLoadError(f"{gf.path}: tensor {part.name!r} is missing")
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise ModelLoadError(f"{gf.path}: tensor {part.name!r} has unsupported type "
                                     f"{t.tensor_type.name} (supported: "
                                     f"{', '.join(SUPPORTED_TYPES)})")
            shape, expected = gf.shape(part.name), (part.rows,) + tail
            if shape != expected:
                raise ModelLoadError(f"{gf.path}: tensor {part.name!r} has shape {list(shape)}, "
                                     f"expected {list(expected)} from the metadata")


# values dequantized at a time: a 16 MB float32 slice, never a whole float copy of a big tensor
# (a 7B model's embedding is 0.5 GB in float32)
_SLICE_VALUES = 1 << 22


def _copy_tensor(gf: GGUFFile, part: _Part, dst: torch.Tensor) -> None:
    """Dequantize ``part`` slice by slice into ``dst`` (its rows of a parameter), cast to the
    parameter's dtype; slices of q/k hold whole heads so their row order can be undone."""
    rows = dst.shape[0]
    step = max(1, _SLICE_VALUES // max(1, dst[0].numel())) if dst.dim() == 2 else rows
    head_rows = rows // part.permute_heads if part.permute_heads else 1
    step = max(1, step // head_rows) * head_rows
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        w = _torch_view(gf, part.name, slice(r0, r1))
        if w is None:
            w = torch.from_numpy(dequantize(gf, part.name, slice(r0, r1)))
        if part.permute_heads:
            copy_unpermuted(dst[r0:r1], w, (r1 - r0) // head_rows)
        else:
            dst[r0:r1].copy_(w)


# our linear modules that can keep GGUF blocks: (path under a decoder layer, or the model)
_QUANT_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_1")   # executed as stored by kernels/quant.c


def _quant_blocks(gf: GGUFFile, parts: list[_Part]) -> torch.Tensor:
    """The parts' raw blocks as one uint8 (rows, row bytes) tensor: a view of the map for a
    single unpermuted tensor, else a copy with q/k rows put back in Hugging Face order (a row
    is whole blocks, so rows move as they do for dense weights)."""
    with warnings.catch_warnings():   # "the given NumPy array is not writable"
        warnings.simplefilter("ignore", UserWarning)
        views = [torch.from_numpy(gf.tensors[p.name].data) for p in parts]
    if len(parts) == 1 and not parts[0].permute_heads:
        return views[0]
    out = torch.empty((sum(p.rows for p in parts), views[0].shape[1]), dtype=torch.uint8)
    offset = 0
    for part, view in zip(parts, views):
        dst = out[offset:offset + part.rows]
        if part.permute_heads:
            copy_unpermuted(dst, view, part.permute_heads)
        else:
            dst.copy_(view)
        offset += part.rows
    return out


def _use_quant_linears(model: torch.nn.Module, gf: GGUFFile,
                       names: dict[str, list[_Part]]) -> dict[str, str]:
    """Swap every linear whose GGUF tensors are all of one type in :data:`QUANT_TYPES` for a
    :class:`QuantLinear` holding those blocks (lm_head too, tied to the embedding or not: as
    llama.cpp, which multiplies by the file's output/token_embd tensor as stored). Returns
    our weight name -> kind for each swapped linear; the rest stay dense."""
    from tokenfactory.model.quant_linear import QuantLinear

    cfg: ModelConfig = model.config
    head_parts = names.get("lm_head.weight", [_Part("token_embd.weight", cfg.vocab_size)])
    targets = [("lm_head", model, "lm_head", head_parts)]
    for i, layer in enumerate(model.layers):
        for path in _QUANT_LINEARS:
            owner_path, attr = path.split(".")
            key = f"layers.{i}.{path}"
            targets.append((key, getattr(layer, owner_path), attr, names[key + ".weight"]))
    swapped = {}
    for key, owner, attr, parts in targets:
        types = {gf.tensors[p.name].tensor_type.name for p in parts}
        if len(types) != 1 or next(iter(types)) not in QUANT_TYPES:
            continue
        dense = getattr(owner, attr)
        bias = None if dense.bias is None else torch.empty_like(dense.bias)   # loaded below
        kind = next(iter(types)).lower()
        setattr(owner, attr, QuantLinear(kind, _quant_blocks(gf, parts), dense.in_features,
                                         bias=bias, float_output=key == "lm_head"))
        swapped[key + ".weight"] = kind
    return swapped


def load_gguf_weights(model: torch.nn.Module, gf: GGUFFile, quantized: bool = False) -> None:
    """Fill every parameter of ``model`` (built from :func:`load_gguf_config` of ``gf``).
    ``quantized``: linears stored as Q8_0/Q4_0/Q4_1 become :class:`QuantLinear` modules
    holding the blocks as stored (only the rest is dequantized)."""
    cfg: ModelConfig = model.config
    names = gguf_tensor_names(cfg, gf.arch)
    params = dict(model.named_parameters(remove_duplicate=False))
    _check_tensors(gf, names, params)
    swapped = _use_quant_linears(model, gf, names) if quantized else {}
    # after the swap, a QuantLinear's bias is a buffer: fill it like a parameter
    targets = {**dict(model.named_buffers(remove_duplicate=False)),
               **dict(model.named_parameters(remove_duplicate=False))}
    threads = torch.get_num_threads()
    # one thread: most tensors are small (0.3M values), and handing each copy to the thread
    # pool cost more than it saved (135M file: 2.4 s CPU with 2 threads, 0.9 s with one)
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for ours, parts in names.items():
                if ours in swapped:
                    continue
                param, offset = targets[ours], 0
                for part in parts:
                    _copy_tensor(gf, part, param[offset:offset + part.rows])
                    offset += part.rows
    finally:
        torch.set_num_threads(threads)
    kinds = Counter(gf.tensors[p.name].tensor_type.name for ours, ps in names.items()
                    if ours not in swapped for p in ps)
    dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    log.info("%s: %s weights (%s) dequantized to %s", gf.path.name, gf.arch,
             ", ".join(f"{n} {k}" for k, n in kinds.most_common()), dtype)
    if quantized:
        runs = Counter(kind for key, kind in swapped.items() if key != "lm_head.weight")
        dense = 1 + len(model.layers) * len(_QUANT_LINEARS) - len(swapped)
        from tokenfactory.model.kernels import quant
        kernels = quant.isa()
        packed = sum(getattr(m, "packed", None) is not None for m in model.modules())
        how = (f"{kernels} kernels, bfloat16 activations rounded to int8 per block of 32; "
               f"{packed} of {len(swapped)} packed for the GEMM kernel (every row count), the "
               f"rest up to 8 rows" if kernels else "no native kernels: dequantized per call")
        log.info("%s: layer linears run as stored: %s; lm_head %s; %d linears dense in %s (%s)",
                 gf.path.name, ", ".join(f"{n} {k}" for k, n in runs.most_common()) or "none",
                 swapped.get("lm_head.weight", dtype), dense, dtype, how)
    if "rope_freqs.weight" in gf.tensors:
        # Llama 3.1-style RoPE: llama.cpp stores the per-frequency divisors it computed from
        # the checkpoint's rope_scaling instead of the parameters themselves
        factors = torch.from_numpy(np.require(dequantize(gf, "rope_freqs.weight"),
                                              requirements="W")).float().flatten()
        rotary = model.rotary
        if factors.numel() != rotary.inv_freq.numel():
            raise ModelLoadError(f"{gf.path}: tensor 'rope_freqs.weight' has {factors.numel()} "
                                 f"values, expected {rotary.inv_freq.numel()}")
        rotary.inv_freq = rotary.inv_freq / factors.to(rotary.inv_freq.device)
