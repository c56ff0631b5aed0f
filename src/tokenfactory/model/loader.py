"""Load a Hugging Face checkpoint directory (or a GGUF file, see gguf.py) into
:class:`LlamaForCausalLM`.

The model is built on the meta device (no memory, no random init), given uninitialized storage
in the target dtype, and filled tensor by tensor from memory-mapped safetensors files, each
tensor cast on the way in. The checkpoint is never copied into RAM as a whole.

Every failure a user can cause (missing or corrupt files, shape mismatches, missing tensors)
becomes a one-line :class:`ModelLoadError` naming the file.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from tokenfactory.model.config import ModelConfig, ModelLoadError, load_model_config
from tokenfactory.model.gguf import is_gguf_file, load_gguf_config, load_gguf_weights, open_gguf
from tokenfactory.model.llama import LlamaForCausalLM
from tokenfactory.model.quant_linear import use_int8_linears

log = logging.getLogger(__name__)

_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_dtype(requested: str | torch.dtype | None, cfg: ModelConfig,
                  device: torch.device | str = "cpu") -> torch.dtype:
    """The compute dtype. ``None``/"auto": the checkpoint's own dtype (float32 if unknown).

    float16 is mapped to bfloat16 on CPU with a warning: CPU fp16 matmuls run ~100x slower.
    """
    if requested is None or requested == "auto":
        dtype = _DTYPE_NAMES.get(cfg.torch_dtype or "float32", torch.float32)
    elif isinstance(requested, torch.dtype):
        dtype = requested
    elif requested in _DTYPE_NAMES:
        dtype = _DTYPE_NAMES[requested]
    else:
        raise ValueError(f"unsupported dtype {requested!r} (use float32 or bfloat16)")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported dtype {dtype} (use float32 or bfloat16)")
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        log.warning("float16 is very slow on CPU; using bfloat16 instead")
        dtype = torch.bfloat16
    return dtype


def _tensor_sources(model_dir: Path) -> tuple[dict[str, Path], Path]:
    """Map each checkpoint tensor name to the file holding it. Also returns the file that
    lists the tensors (the index, or the single safetensors file) for error messages."""
    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index}: not a valid safetensors index "
                                 f"({type(exc).__name__}: {exc})") from None
        files = {name: model_dir / fname for name, fname in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.exists():
                raise ModelLoadError(f"{path}: shard listed in {index.name} is missing")
        return files, index
    if single.exists():
        return {name: single for name in _keys(single)}, single
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise ModelLoadError(f"{model_dir}: no model.safetensors, model.safetensors.index.json "
                             "or *.safetensors files found")
    files = {}
    for path in shards:
        files.update({name: path for name in _keys(path)})
    return files, shards[0]


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ModelLoadError(f"{path}: not a readable safetensors file "
                             f"({_one_line(exc)})") from None


def _keys(path: Path) -> list[str]:
    with _open(path) as f:
        return list(f.keys())


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def checkpoint_names(cfg: ModelConfig) -> dict[str, list[str]]:
    """Our parameter name -> checkpoint tensor names concatenated (dim 0) to form it."""
    names: dict[str, list[str]] = {"embed_tokens.weight": ["model.embed_tokens.weight"],
                                   "norm.weight": ["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = ["lm_head.weight"]
    for i in range(cfg.num_layers):
        p, hp = f"layers.{i}.", f"model.layers.{i}."
        attn, mlp = hp + "self_attn.", hp + "mlp."
        names[p + "self_attn.qkv_proj.weight"] = [attn + f"{x}_proj.weight" for x in "qkv"]
        if cfg.qkv_bias:
            names[p + "self_attn.qkv_proj.bias"] = [attn + f"{x}_proj.bias" for x in "qkv"]
        names[p + "self_attn.o_proj.weight"] = [attn + "o_proj.weight"]
        if cfg.o_bias:
            names[p + "self_attn.o_proj.bias"] = [attn + "o_proj.bias"]
        if cfg.qk_norm:
            names[p + "self_attn.q_norm.weight"] = [attn + "q_norm.weight"]
            names[p + "self_attn.k_norm.weight"] = [attn + "k_norm.weight"]
        names[p + "mlp.gate_up_proj.weight"] = [mlp + "gate_proj.weight", mlp + "up_proj.weight"]
        names[p + "mlp.down_proj.weight"] = [mlp + "down_proj.weight"]
        if cfg.mlp_bias:
            names[p + "mlp.gate_up_proj.bias"] = [mlp + "gate_proj.bias", mlp + "up_proj.bias"]
            names[p + "mlp.down_proj.bias"] = [mlp + "down_proj.bias"]
        names[p + "input_layernorm.weight"] = [hp + "input_layernorm.weight"]
        names[p + "post_attention_layernorm.weight"] = [hp + "post_attention_layernorm.weight"]
    return names


def _part_rows(cfg: ModelConfig, ours: str, num_parts: int, total: int) -> list[int]:
    """Rows each checkpoint tensor contributes to a fused parameter."""
    if num_parts == 1:
        return [total]
    if "qkv_proj" in ours:
        kv = cfg.num_kv_heads * cfg.head_dim
        return [cfg.num_heads * cfg.head_dim, kv, kv]
    return [total // num_parts] * num_parts  # gate/up


def load_weights(model: LlamaForCausalLM, model_dir: Path) -> None:
    """Fill every parameter of ``model`` from the checkpoint, casting per tensor."""
    sources, listing = _tensor_sources(model_dir)
    params = dict(model.named_parameters(remove_duplicate=False))
    handles: dict[Path, object] = {}
    try:
        for ours, theirs in checkpoint_names(model.config).items():
            param = params[ours]
            offset = 0
            for name, rows in zip(theirs, _part_rows(model.config, ours, len(theirs),
                                                     param.shape[0])):
                path = sources.get(name)
                if path is None:
                    raise ModelLoadError(f"{listing}: tensor {name!r} is missing")
                if path not in handles:
                    handles[path] = _open(path).__enter__()
                f = handles[path]
                expected = (rows,) + tuple(param.shape[1:])
                try:
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != expected:
                        raise ModelLoadError(
                            f"{path}: tensor {name!r} has shape {list(shape)}, expected "
                            f"{list(expected)} from config.json")
                    param.data[offset:offset + rows].copy_(f.get_tensor(name))
                except ModelLoadError:
                    raise
                except Exception as exc:  # truncated data, bad dtype, I/O errors
                    raise ModelLoadError(f"{path}: cannot read tensor {name!r} "
                                         f"({_one_line(exc)})") from None
                offset += rows
    finally:
        for f in handles.values():
            f.__exit__(None, None, None)


QUANTIZATIONS = ("gguf", "none", "int8")


def resolve_quantization(requested: str | None, is_gguf: bool, dtype: torch.dtype,
                         device: torch.device | str = "cpu") -> str:
    """How linear weights are held -- see :func:`load_model`. "gguf": a GGUF file's
    Q8_0/Q4_0/Q4_1 linears run as stored (other files: nothing to keep, same as "none");
    "none": dequantized to ``dtype``; "int8": per-channel int8 at load.

    ``None``/"auto": "gguf" for a GGUF file served in bfloat16 on a CPU whose native build
    has the AVX-512 VNNI quantized kernels (there, measured in benchmarks/quantized.py, running
    the blocks as stored beats dequantized bfloat16 in decode, prefill and first-token time,
    and reads 2.8x fewer bytes per token), else "none": an explicit float32 asks for
    reference arithmetic (the transformers comparisons), and without the VNNI kernels the
    quantized path is the slower one."""
    if requested in (None, "auto"):
        return "gguf" if is_gguf and _quantized_kernels_pay(dtype, device) else "none"
    choice = requested
    if choice not in QUANTIZATIONS:
        raise ValueError(f"unsupported quantization {requested!r} (use {', '.join(QUANTIZATIONS)})")
    if choice != "none" and torch.device(device).type != "cpu":
        raise ValueError(f"quantization {choice!r} runs on CPU only")
    return choice if (choice != "gguf" or is_gguf) else "none"


def _quantized_kernels_pay(dtype: torch.dtype, device: torch.device | str) -> bool:
    if dtype != torch.bfloat16 or torch.device(device).type != "cpu":
        return False
    from tokenfactory.model.kernels import quant
    lib = quant.library()
    return lib is not None and lib.tf_qlinear_isa() == 2   # ISA_NAMES[2]: AVX-512 VNNI + BF16


def load_model(model_dir: str | Path, dtype: str | torch.dtype | None = None,
               device: torch.device | str = "cpu",
               quantization: str | None = None) -> LlamaForCausalLM:
    """Read a Hugging Face directory (config.json + safetensors) or a GGUF file (recognized
    by its magic bytes, see gguf.py); returns an eval-mode model. A GGUF file is served in
    bfloat16 unless ``dtype`` says otherwise. ``quantization`` (see
    :func:`resolve_quantization`): "gguf" keeps a GGUF file's quantized linears as stored
    (model/quant_linear.py), "int8" quantizes the layers' linears per output channel,
    "none"/None dequantizes everything to ``dtype``."""
    model_dir = Path(model_dir)
    gguf_file = None
    if is_gguf_file(model_dir) or (model_dir.suffix.lower() == ".gguf" and not model_dir.is_dir()):
        gguf_file = open_gguf(model_dir)   # one-line errors for missing/truncated files
        cfg = load_gguf_config(gguf_file)
    elif model_dir.is_file():
        raise ModelLoadError(f"{model_dir}: not a GGUF file (no GGUF magic) and not a model "
                             "directory")
    else:
        cfg = load_model_config(model_dir)
    torch_dtype = resolve_dtype(dtype, cfg, device)
    quant = resolve_quantization(quantization, gguf_file is not None, torch_dtype, device)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(torch_dtype)
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary.to(device)
    if gguf_file is not None:
        load_gguf_weights(model, gguf_file, quantized=quant == "gguf")
    else:
        load_weights(model, model_dir)
    if quant == "int8":
        count = use_int8_linears(model)
        log.info("%s: %d linears quantized to int8 per output channel at load; embedding and "
                 "lm_head in %s", model_dir.name, count, str(torch_dtype).removeprefix("torch."))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
