"""One description of a decoder checkpoint, read from a Hugging Face ``config.json``.

Both the forward pass (``model/config.py``) and the economics (``economics/catalog.py``) need
the same facts about a checkpoint: its dimensions, heads, experts, which layers attend through a
sliding window, and what one token costs in KV cache. They used to parse config.json each with
their own sliding-window rules and disagreed on some checkpoints; this module is the one parser
both build on. It sits below every package (it imports nothing from ``tokenfactory``), so the
model layer and the economics can both use it without importing each other.

Key styles covered: Llama / Mistral (``sliding_window``) / Mixtral / Qwen2-3 dense and MoE
(``use_sliding_window`` + ``max_window_layers``) / DeepSeek-V3 (MLA) / GPT-OSS and Gemma
(``layer_types``, ``sliding_window_pattern``) / Llama 4 (``text_config``, chunked attention,
interleaved MoE).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional


class ModelDescriptionError(ValueError):
    """A config that cannot describe a model. The message is one line naming the source."""


# Bytes per element for weight and KV-cache precisions. fp4/int4 ignore block-scale overhead
# (NVFP4 adds one fp8 scale per 16 values, +6%; MXFP4 one per 32, +3%).
DTYPE_BYTES: dict[str, float] = {
    "fp32": 4.0, "float32": 4.0,
    "bf16": 2.0, "bfloat16": 2.0, "fp16": 2.0, "float16": 2.0,
    "fp8": 1.0, "int8": 1.0, "fp8_e4m3": 1.0, "fp8_e5m2": 1.0,
    "fp4": 0.5, "int4": 0.5, "nvfp4": 0.5, "mxfp4": 0.5,
}


def dtype_bytes(dtype: str) -> float:
    """Bytes per element of a precision name (``"bf16"``, ``"bfloat16"``, ``"fp8"``, ...)."""
    try:
        return DTYPE_BYTES[dtype.lower()]
    except KeyError:
        raise ModelDescriptionError(
            f"unknown precision {dtype!r}; valid: {', '.join(sorted(set(DTYPE_BYTES)))}"
        ) from None


@dataclass(frozen=True)
class MlaSpec:
    """DeepSeek Multi-head Latent Attention: the cache holds one compressed latent of
    ``kv_lora_rank`` plus one shared RoPE key of ``qk_rope_head_dim`` per token per layer."""
    kv_lora_rank: int
    q_lora_rank: Optional[int]
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class ModelDescription:
    """The shape of a decoder: what sizes its weights and its KV cache."""
    name: str
    source: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int            # dense MLP width (dense layers only)
    tied_embeddings: bool = False
    max_context: int = 0
    num_experts: int = 0              # routed experts per MoE layer (0 = dense model)
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0   # total width of always-on shared experts
    moe_layers: tuple[int, ...] = ()
    mla: Optional[MlaSpec] = None
    # Per layer: attention window in tokens (a token sees itself and the previous window-1
    # positions, HF's ``kv_idx > q_idx - sliding_window``; Llama 4's chunks are counted the
    # same way for cache size), or None for full attention.
    layer_windows: tuple[Optional[int], ...] = field(default=())
    architecture: str = ""            # e.g. "LlamaForCausalLM"; "" when the config names none

    def __post_init__(self) -> None:
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (None,) * self.num_layers)
        if len(self.layer_windows) != self.num_layers:
            raise ModelDescriptionError(f"{self.name}: layer_windows must have one entry per "
                                        "layer")
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                     "vocab_size"):
            if getattr(self, name) <= 0:
                raise ModelDescriptionError(f"{self.name}: {name} must be positive")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0 and bool(self.moe_layers)

    def with_kv_heads(self, kv_heads: int) -> "ModelDescription":
        """A variant with a different KV-head count (e.g. the MHA counterfactual)."""
        return replace(self, num_kv_heads=kv_heads, name=f"{self.name}[kv_heads={kv_heads}]")

    def kv_bytes_per_token_per_layer(self, kv_dtype: str = "bf16") -> float:
        """K and V for one token in one layer: 2 * kv_heads * head_dim * bytes (MHA/GQA/MQA),
        or the MLA latent plus its decoupled RoPE key: (kv_lora_rank + qk_rope_head_dim) *
        bytes."""
        b = dtype_bytes(kv_dtype)
        if self.mla:
            return (self.mla.kv_lora_rank + self.mla.qk_rope_head_dim) * b
        return 2 * self.num_kv_heads * self.head_dim * b

    def kv_bytes_per_token(self, kv_dtype: str = "bf16") -> float:
        """Cache bytes one more token costs while the context is shorter than every window
        (summed over all layers, sliding ones included)."""
        return self.num_layers * self.kv_bytes_per_token_per_layer(kv_dtype)


def _first(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        value = config.get(key)
        if value is not None:
            return value
    return default


def describe_hf_config(config: dict[str, Any], name: str = "config.json",
                       source: str = "Hugging Face config.json") -> ModelDescription:
    """Read a parsed Hugging Face ``config.json`` into a :class:`ModelDescription`.

    ``name`` names the config in error messages. Raises :class:`ModelDescriptionError`."""
    try:
        return _describe(config, name, source)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ModelDescriptionError):
            raise
        detail = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ModelDescriptionError(f"{name}: unreadable config: {detail}") from None


def _describe(config: Any, name: str, source: str) -> ModelDescription:
    if not isinstance(config, dict):
        raise ModelDescriptionError(f"{name}: expected a JSON object at the top level")
    if isinstance(config.get("text_config"), dict):       # Llama 4, multimodal wrappers
        config = {**config, **config["text_config"]}
    required = (("hidden_size", "n_embd", "d_model"), ("num_attention_heads", "n_head"),
                ("num_hidden_layers", "n_layer", "num_layers"), ("vocab_size",))
    values = []
    for keys in required:
        value = _first(config, *keys)
        if value is None:
            raise ModelDescriptionError(f"{name}: config lacks required key {keys[0]!r}")
        try:
            values.append(int(value))
        except (TypeError, ValueError):
            raise ModelDescriptionError(f"{name}: {keys[0]} is not an integer: "
                                        f"{value!r}") from None
    hidden, heads, layers, vocab = values
    if heads <= 0:
        raise ModelDescriptionError(f"{name}: num_attention_heads must be positive")
    kv_heads = int(_first(config, "num_key_value_heads", "num_kv_heads", default=heads))
    head_dim = int(_first(config, "head_dim", default=hidden // heads))
    archs = config.get("architectures") or []
    architecture = str(archs[0]) if archs else ""

    # MLP widths. Llama 4 names the dense width intermediate_size_mlp and the expert width
    # intermediate_size; Mixtral and GPT-OSS use intermediate_size for the experts.
    dense_inter = int(_first(config, "intermediate_size_mlp", "intermediate_size",
                             "ffn_dim", default=4 * hidden))
    experts = int(_first(config, "n_routed_experts", "num_local_experts", "num_experts",
                         default=0) or 0)
    moe_kwargs: dict[str, Any] = {}
    if experts:
        top_k = int(_first(config, "num_experts_per_tok", "experts_per_token", "top_k",
                           default=2))
        expert_inter = int(_first(config, "moe_intermediate_size", "intermediate_size",
                                  default=dense_inter))
        if "shared_expert_intermediate_size" in config:           # Qwen2-MoE
            shared_inter = int(config["shared_expert_intermediate_size"] or 0)
        elif "n_shared_experts" in config:                        # DeepSeek
            shared_inter = int(config["n_shared_experts"] or 0) * expert_inter
        elif str(config.get("model_type", "")).startswith("llama4") \
                or "intermediate_size_mlp" in config:
            shared_inter = expert_inter                           # Llama 4: one shared expert
        else:
            shared_inter = 0
        moe_kwargs = dict(num_experts=experts, experts_per_token=top_k,
                          expert_intermediate_size=expert_inter,
                          shared_expert_intermediate_size=shared_inter,
                          moe_layers=_moe_layers(config, layers))

    mla = None
    if config.get("kv_lora_rank"):
        mla = MlaSpec(kv_lora_rank=int(config["kv_lora_rank"]),
                      q_lora_rank=int(config["q_lora_rank"]) if config.get("q_lora_rank") else None,
                      qk_nope_head_dim=int(config["qk_nope_head_dim"]),
                      qk_rope_head_dim=int(config["qk_rope_head_dim"]),
                      v_head_dim=int(config["v_head_dim"]))

    return ModelDescription(
        name=name, source=source, num_layers=layers, hidden_size=hidden, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=vocab,
        intermediate_size=dense_inter,
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_context=int(config.get("max_position_embeddings") or 0), mla=mla,
        layer_windows=layer_windows(config, layers), architecture=architecture, **moe_kwargs,
    )


def _moe_layers(config: dict[str, Any], layers: int) -> tuple[int, ...]:
    if isinstance(config.get("moe_layers"), list) and config["moe_layers"]:
        return tuple(int(i) for i in config["moe_layers"])
    if config.get("first_k_dense_replace") is not None:                      # DeepSeek
        first = int(config["first_k_dense_replace"])
        freq = int(config.get("moe_layer_freq") or 1)
        return tuple(i for i in range(first, layers) if i % freq == 0)
    if config.get("interleave_moe_layer_step"):                              # Llama 4
        step = int(config["interleave_moe_layer_step"])
        return tuple(range(step - 1, layers, step))
    step = int(config.get("decoder_sparse_step") or 1)                       # Qwen MoE
    dense = set(config.get("mlp_only_layers") or ())
    return tuple(i for i in range(layers) if (i + 1) % step == 0 and i not in dense)


def _is_qwen(config: dict[str, Any]) -> bool:
    archs = [str(a) for a in config.get("architectures") or []]
    return (str(config.get("model_type", "")).startswith("qwen")
            or any(a.startswith("Qwen") for a in archs))


def layer_windows(config: dict[str, Any], layers: int) -> tuple[Optional[int], ...]:
    """Per layer, the attention window (or Llama 4 chunk) in tokens, None for full attention.

    The rules follow ``transformers``' config classes: Qwen2/3 (dense and MoE) ignore
    ``sliding_window`` unless ``use_sliding_window`` is set and then window the layers from
    ``max_window_layers`` (default 28) on; an explicit ``layer_types`` list wins (GPT-OSS
    alternates sliding and full layers without one); Gemma's
    ``sliding_window_pattern`` makes every n-th layer global; Mistral windows every layer."""
    window = config.get("sliding_window")
    window = int(window) if window else None
    qwen = _is_qwen(config)
    if qwen and not config.get("use_sliding_window", False):
        window = None
    if "use_sliding_window" in config and not config["use_sliding_window"]:
        window = None
    chunk = config.get("attention_chunk_size")
    layer_types = config.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == layers:         # GPT-OSS, Gemma 3
        return tuple(window if t == "sliding_attention"
                     else int(chunk) if t == "chunked_attention" and chunk else None
                     for t in layer_types)
    if chunk:                                                                # Llama 4
        rope = config.get("no_rope_layers") or []
        if len(rope) != layers:
            interval = int(config.get("no_rope_layer_interval") or 4)
            rope = [int((i + 1) % interval != 0) for i in range(layers)]
        return tuple(int(chunk) if rope[i] else None for i in range(layers))
    if window is None:
        return (None,) * layers
    if "sliding_window_pattern" in config:                                   # Gemma 2/3 style
        every = int(config["sliding_window_pattern"])
        return tuple(None if (i + 1) % every == 0 else window for i in range(layers))
    if config.get("model_type") == "gpt_oss":                                # GPT-OSS default
        return tuple(window if i % 2 == 0 else None for i in range(layers))
    if qwen:
        first = int(_first(config, "max_window_layers", default=28))
        return tuple(window if i >= first else None for i in range(layers))
    return (window,) * layers                                                # Mistral
