"""Read a Hugging Face ``config.json`` into a ``ModelSpec``.

Covers Llama / Mistral (sliding_window) / Mixtral / Qwen2-3 dense and MoE / DeepSeek-V3 (MLA) /
GPT-OSS (layer_types) / Llama 4 (text_config, chunked attention, interleaved MoE) key styles.
"""

from __future__ import annotations

from typing import Any, Optional

from .catalog import CatalogError, MlaSpec, ModelSpec


def _first(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        value = config.get(key)
        if value is not None:
            return value
    return default


def model_from_hf_config(config: dict[str, Any], name: str = "hf-config",
                         source: str = "Hugging Face config.json") -> ModelSpec:
    """Normalize a Hugging Face ``config.json`` dict into a ``ModelSpec``."""
    if isinstance(config.get("text_config"), dict):       # Llama 4, multimodal wrappers
        config = {**config, **config["text_config"]}
    try:
        layers = int(_first(config, "num_hidden_layers", "n_layer", "num_layers"))
        hidden = int(_first(config, "hidden_size", "n_embd", "d_model"))
        heads = int(_first(config, "num_attention_heads", "n_head"))
        vocab = int(config["vocab_size"])
    except (KeyError, TypeError, ValueError):
        raise CatalogError(f"{name}: config.json lacks num_hidden_layers/hidden_size/"
                           "num_attention_heads/vocab_size") from None
    kv_heads = int(_first(config, "num_key_value_heads", "num_kv_heads", default=heads))
    head_dim = int(_first(config, "head_dim", default=hidden // heads))

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
        elif config.get("model_type", "").startswith("llama4") or "intermediate_size_mlp" in config:
            shared_inter = expert_inter                           # Llama 4: one shared expert
        else:
            shared_inter = 0
        moe_kwargs = dict(num_experts=experts, experts_per_token=top_k,
                          expert_intermediate_size=expert_inter,
                          shared_expert_intermediate_size=shared_inter,
                          moe_layers=_hf_moe_layers(config, layers))

    mla = None
    if config.get("kv_lora_rank"):
        mla = MlaSpec(kv_lora_rank=int(config["kv_lora_rank"]),
                      q_lora_rank=int(config["q_lora_rank"]) if config.get("q_lora_rank") else None,
                      qk_nope_head_dim=int(config["qk_nope_head_dim"]),
                      qk_rope_head_dim=int(config["qk_rope_head_dim"]),
                      v_head_dim=int(config["v_head_dim"]))

    return ModelSpec(
        name=name, source=source, num_layers=layers, hidden_size=hidden, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=vocab,
        intermediate_size=dense_inter,
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_context=int(config.get("max_position_embeddings") or 0), mla=mla,
        layer_windows=_hf_layer_windows(config, layers), **moe_kwargs,
    )


def _hf_moe_layers(config: dict[str, Any], layers: int) -> tuple[int, ...]:
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


def _hf_layer_windows(config: dict[str, Any], layers: int) -> tuple[Optional[int], ...]:
    window = config.get("sliding_window")
    layer_types = config.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == layers:         # GPT-OSS, Gemma 3
        return tuple(int(window) if window and "sliding" in str(t) else None
                     for t in layer_types)
    chunk = config.get("attention_chunk_size")
    if chunk:                                                                # Llama 4
        rope = config.get("no_rope_layers") or []
        if len(rope) != layers:
            interval = int(config.get("no_rope_layer_interval") or 4)
            rope = [int((i + 1) % interval != 0) for i in range(layers)]
        return tuple(int(chunk) if rope[i] else None for i in range(layers))
    if window and config.get("use_sliding_window", True):
        if "sliding_window_pattern" in config:                               # Gemma 2/3 style
            every = int(config["sliding_window_pattern"])
            return tuple(None if (i + 1) % every == 0 else int(window) for i in range(layers))
        first = int(config.get("max_window_layers") or 0) if "use_sliding_window" in config else 0
        return tuple(int(window) if i >= first else None for i in range(layers))     # Mistral
    return (None,) * layers
