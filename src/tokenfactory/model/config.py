"""What the forward pass needs to know about a checkpoint, parsed from its ``config.json``.

Two config dialects are in use and both are accepted:

* published checkpoints: top-level ``rope_theta`` + ``rope_scaling`` (``type`` or ``rope_type``)
  and ``torch_dtype``;
* ``transformers`` >= 5: ``rope_parameters`` (``rope_type`` and ``rope_theta`` inside, possibly
  nested per layer type such as ``{"full_attention": {...}, "sliding_attention": {...}}``) and
  ``dtype``.

The shape of the model (dims, heads, per-layer sliding windows) comes from the one config.json
parser the economics use too (``tokenfactory.model_description``); this module adds what only
the forward pass needs (RoPE, biases, norms, dtype) and refuses architectures it cannot run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenfactory.model_description import (
    ModelDescription, ModelDescriptionError, describe_hf_config,
)


class ModelLoadError(ValueError):
    """A checkpoint directory that cannot be loaded. The message is one line naming the file."""


# architecture name -> per-architecture defaults that are not spelled out in config.json
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {"qkv_bias": None, "qk_norm": False},      # None: from attention_bias
    "MistralForCausalLM": {"qkv_bias": False, "qk_norm": False},
    "Qwen2ForCausalLM": {"qkv_bias": True, "qk_norm": False},      # q/k/v bias, no o_proj bias
    "Qwen3ForCausalLM": {"qkv_bias": None, "qk_norm": True},       # per-head q/k RMSNorm
}

_DTYPES = {"float32", "bfloat16", "float16"}


@dataclass
class RopeConfig:
    rope_type: str = "default"         # default | linear | dynamic | yarn | llama3
    theta: float = 10000.0
    factor: float = 1.0
    # llama3 / yarn: the context the model was pretrained with
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0       # llama3
    high_freq_factor: float = 4.0      # llama3
    beta_fast: float = 32.0            # yarn
    beta_slow: float = 1.0             # yarn
    mscale: float | None = None        # yarn
    mscale_all_dim: float | None = None  # yarn
    attention_factor: float | None = None  # yarn: explicit cos/sin scale
    truncate: bool = True              # yarn: round the correction range
    partial_rotary_factor: float = 1.0


@dataclass
class ModelConfig:
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False             # bias on q/k/v projections
    o_bias: bool = False               # bias on the output projection
    mlp_bias: bool = False
    qk_norm: bool = False
    rope: RopeConfig = field(default_factory=RopeConfig)
    # Per layer: attention window in tokens (a token sees itself and the previous window-1
    # positions, HF's ``kv_idx > q_idx - sliding_window``), or None for full attention.
    sliding_windows: list[int | None] = field(default_factory=list)
    torch_dtype: str | None = None     # the checkpoint's dtype name, e.g. "bfloat16"
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        if not self.sliding_windows:
            self.sliding_windows = [None] * self.num_layers

    @property
    def sliding_window(self) -> int | None:
        """The window of the first windowed layer (None if every layer sees everything)."""
        return next((w for w in self.sliding_windows if w is not None), None)

    @property
    def max_model_len(self) -> int:
        """Longest context the model supports, following vLLM: scaled-RoPE types that extend
        the context by a factor (linear, dynamic, yarn) multiply the pretrained length."""
        r = self.rope
        if r.rope_type in ("linear", "dynamic"):
            return int(self.max_position_embeddings * r.factor)
        if r.rope_type == "yarn" and r.original_max_position_embeddings:
            return max(self.max_position_embeddings,
                       int(r.original_max_position_embeddings * r.factor))
        return self.max_position_embeddings

    @property
    def description(self) -> ModelDescription:
        """This checkpoint as the shared :class:`ModelDescription` (the economics' view: KV
        bytes per token, parameter counts). Built from the fields, so a GGUF-loaded config has
        one too."""
        return ModelDescription(
            name=self.architecture, source="checkpoint config", num_layers=self.num_layers,
            hidden_size=self.hidden_size, num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, vocab_size=self.vocab_size,
            intermediate_size=self.intermediate_size, tied_embeddings=self.tie_word_embeddings,
            max_context=self.max_model_len, layer_windows=tuple(self.sliding_windows),
            architecture=self.architecture)

    def num_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        mlp = 3 * h * self.intermediate_size
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp + 2 * h) + emb + h


def _parse_rope(cfg: dict[str, Any], max_pos: int, where: str) -> RopeConfig:
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) or v is None
                                                   for v in params.values()):
        # transformers >= 5 nests parameters per layer type; these decoders use one RoPE for all
        nested = [v for v in params.values() if v]
        params = params.get("full_attention") or (nested[0] if nested else {})
    if not params:
        params = cfg.get("rope_scaling") or {}
    params = dict(params)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if rope_type not in ("default", "linear", "dynamic", "yarn", "llama3"):
        raise ModelLoadError(f"{where}: unsupported RoPE type {rope_type!r} (supported: default, "
                             "linear, dynamic, yarn, llama3)")
    factor = params.get("factor")
    if rope_type in ("linear", "dynamic", "llama3") and factor is None:
        raise ModelLoadError(f"{where}: RoPE type {rope_type!r} needs a 'factor'")
    orig = params.get("original_max_position_embeddings",
                      cfg.get("original_max_position_embeddings"))
    if rope_type in ("yarn", "llama3") and orig is None:
        orig = max_pos  # what transformers assumes when it is not given
    if rope_type == "yarn" and factor is None:
        factor = max_pos / orig
    try:
        return RopeConfig(
            rope_type=rope_type, theta=float(theta), factor=float(factor or 1.0),
            original_max_position_embeddings=int(orig) if orig is not None else None,
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
            attention_factor=params.get("attention_factor"),
            truncate=bool(params.get("truncate", True)),
            partial_rotary_factor=float(params.get("partial_rotary_factor",
                                                   cfg.get("partial_rotary_factor", 1.0))))
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{where}: bad RoPE parameters: {exc}") from None


def parse_model_config(cfg: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Build a :class:`ModelConfig` from a parsed config.json dict; ``where`` names the file."""
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{where}: expected a JSON object at the top level")
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise ModelLoadError(f"{where}: unsupported architectures {archs!r} (supported: "
                             f"{', '.join(ARCHITECTURES)})")

    try:
        desc = describe_hf_config(cfg, where)
    except ModelDescriptionError as exc:
        raise ModelLoadError(str(exc)) from None
    if cfg.get("intermediate_size") is None:
        raise ModelLoadError(f"{where}: config lacks required key 'intermediate_size'")
    heads, kv_heads = desc.num_heads, desc.num_kv_heads
    max_pos = int(cfg.get("max_position_embeddings") or 2048)
    if heads % kv_heads:
        raise ModelLoadError(f"{where}: num_attention_heads ({heads}) is not a multiple of "
                             f"num_key_value_heads ({kv_heads})")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ModelLoadError(f"{where}: unsupported hidden_act {act!r} (supported: silu)")
    defaults = ARCHITECTURES[arch]
    attention_bias = bool(cfg.get("attention_bias", False))
    qkv_bias = attention_bias if defaults["qkv_bias"] is None else defaults["qkv_bias"]
    dtype = cfg.get("dtype") or cfg.get("torch_dtype")
    if dtype is not None and dtype not in _DTYPES:
        dtype = None
    tie = cfg.get("tie_word_embeddings", False)  # transformers' default for all four
    return ModelConfig(
        architecture=arch, hidden_size=desc.hidden_size, num_layers=desc.num_layers,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=desc.head_dim,
        intermediate_size=desc.intermediate_size, vocab_size=desc.vocab_size,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), max_position_embeddings=max_pos,
        tie_word_embeddings=bool(tie), qkv_bias=qkv_bias,
        o_bias=attention_bias and arch != "Qwen2ForCausalLM",
        mlp_bias=bool(cfg.get("mlp_bias", False)), qk_norm=defaults["qk_norm"],
        rope=_parse_rope(cfg, max_pos, where),
        sliding_windows=list(desc.layer_windows), torch_dtype=dtype,
        hidden_act="silu")


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """Read ``model_dir/config.json``; raise :class:`ModelLoadError` naming the file on failure."""
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise ModelLoadError(f"{model_dir}: model directory does not exist")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: config.json not found") from None
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: "
                             f"{exc.msg}") from None
    return parse_model_config(cfg, str(path))
