"""Tiny random checkpoints built with ``transformers`` (session-scoped) for parity tests.

A large ``initializer_range`` makes logits well separated, so greedy decoding compares
tokens rather than coin tosses. Biases and norm weights (zero/one at init) are randomized too,
so loading them wrongly cannot go unnoticed.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
            initializer_range=0.5, rms_norm_eps=1e-6)

# name -> (config class, overrides)
VARIANTS: dict[str, tuple[type, dict]] = {
    "llama_mha": (transformers.LlamaConfig, dict(num_key_value_heads=4)),
    "llama_gqa": (transformers.LlamaConfig, {}),
    "llama_mqa": (transformers.LlamaConfig, dict(num_key_value_heads=1)),
    "llama31": (transformers.LlamaConfig, dict(rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64), rope_theta=500000.0)),
    "llama_linear": (transformers.LlamaConfig, dict(rope_scaling=dict(rope_type="linear",
                                                                      factor=2.0))),
    # max_position_embeddings 32: decoding past position 32 exercises the NTK base growth
    "llama_dynamic": (transformers.LlamaConfig, dict(max_position_embeddings=32, rope_scaling=dict(
        rope_type="dynamic", factor=2.0))),
    "llama_yarn": (transformers.LlamaConfig, dict(rope_scaling=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=64))),
    "qwen2_tied": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=32)),  # head_dim != hidden / heads
    "mistral_sw": (transformers.MistralConfig, dict(sliding_window=8)),
}


def build_hf_model(name: str, seed: int = 0):
    cls, overrides = VARIANTS[name]
    config = cls(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.normal_(0.0, 0.5)
            elif "norm" in pname:
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> (directory, transformers model), built once per session."""
    cache: dict[str, tuple[Path, object]] = {}

    def get(name: str):
        if name not in cache:
            model = build_hf_model(name)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            cache[name] = (path, model)
        return cache[name]

    return get


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(2)


def pytest_generate_tests(metafunc):
    """A test taking a ``variant`` argument runs once per checkpoint variant."""
    if "variant" in metafunc.fixturenames:
        metafunc.parametrize("variant", list(VARIANTS))


def run_engine(ex, prompts, params, *, require_length: bool = False, **cfg):
    """Drive an EngineCore over ``ex`` until every prompt finished; returns (outputs in prompt
    order, engine). Checks that no request failed and that every KV page came back."""
    from tokenfactory.engine.core import EngineConfig, EngineCore

    config = dict(num_kv_blocks=256, block_size=4, max_num_batched_tokens=32, max_num_seqs=8)
    config.update(cfg)
    engine = EngineCore(ex, EngineConfig(**config), model_max_len=ex.max_model_len)
    plist = params if isinstance(params, list) else [params] * len(prompts)
    for i, (p, sp) in enumerate(zip(prompts, plist)):
        engine.add_request(str(i), p, sp)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert out.error is None, out.error
                if require_length:
                    assert out.outputs[0].finish_reason == "length"
                done[out.request_id] = out
    assert engine.num_free_blocks() == config["num_kv_blocks"]
    return [done[str(i)] for i in range(len(prompts))], engine


# ---------------------------------------------------------------- GGUF files
# Hugging Face tensor name pieces -> GGUF (llama.cpp) names
_GGUF_LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                     "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                     "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
                     "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                     "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                     "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf_name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
           "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)          # model.layers.N.<module>.<kind>
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_LAYER_NAMES[module]}.{kind}"


def llamacpp_permute(w, heads: int):
    """What llama.cpp's converter does to llama/mistral q and k rows (written from its
    description: HF's rotate-half pairs (i, i + D/2) become neighbours (2i, 2i + 1))."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def k_quant_blocks(qtype, num_blocks: int, rng):
    """Random K-quant blocks with small finite scales (gguf-py cannot quantize K types)."""
    import gguf
    import numpy as np

    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, size=(num_blocks, block_bytes), dtype=np.uint8)
    scale = lambda: rng.uniform(1e-3, 4e-3, size=num_blocks).astype(np.float16).view(np.uint8) \
        .reshape(num_blocks, 2)  # noqa: E731
    if qtype.name in ("Q4_K", "Q5_K"):       # d, dmin at the start
        blocks[:, 0:2], blocks[:, 2:4] = scale(), scale()
    else:                                    # Q6_K: d at the end
        blocks[:, -2:] = scale()
    return blocks


def write_gguf(path, model, arch: str, *, qtype=None, drop=(), metadata=None, extra=None):
    """Write a transformers model as a GGUF file the way llama.cpp's converter lays it out.

    ``qtype(gguf_name, shape) -> GGMLQuantizationType`` picks each tensor's type (F32 if None);
    ``drop``: GGUF tensor names left out; ``metadata``: extra/overriding keys
    ({key: value}, written with the writer's typed helpers by Python type); ``extra``: more
    tensors {name: (array, raw_dtype or None)}."""
    import gguf
    import numpy as np

    cfg = model.config
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), arch)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    keys = {"block_count": cfg.num_hidden_layers, "context_length": cfg.max_position_embeddings,
            "embedding_length": cfg.hidden_size, "feed_forward_length": cfg.intermediate_size,
            "attention.head_count": heads, "attention.head_count_kv": kv_heads,
            "attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
            "rope.freq_base": float(getattr(cfg, "rope_theta", None)
                                    or cfg.rope_parameters["rope_theta"]),
            "attention.key_length": head_dim, "attention.value_length": head_dim,
            "rope.dimension_count": head_dim, "vocab_size": cfg.vocab_size}
    if getattr(cfg, "sliding_window", None) and arch == "mistral":
        keys["attention.sliding_window"] = cfg.sliding_window
    keys = {f"{arch}.{k}": v for k, v in keys.items()}
    keys.update(metadata or {})
    for key, value in keys.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        gname = gguf_name(name)
        if gname in drop:
            continue
        w = tensor.detach().float().numpy()
        if arch in ("llama", "mistral") and gname.split(".")[-2] in ("attn_q", "attn_k"):
            w = llamacpp_permute(w, heads if ".attn_q." in gname else kv_heads)
        t = qtype(gname, w.shape) if qtype is not None and w.ndim == 2 else None
        if t is None or t == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gname, np.ascontiguousarray(w))
        elif t == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gname, w.astype(np.float16))
        elif t.name in ("Q4_K", "Q5_K", "Q6_K"):
            n = w.size // 256
            writer.add_tensor(gname, k_quant_blocks(t, n, rng).reshape(w.shape[0], -1),
                              raw_dtype=t)
        else:
            try:
                data = gguf.quants.quantize(w, t)
            except NotImplementedError:   # e.g. IQ types: random bytes of the right size
                block, size = gguf.GGML_QUANT_SIZES[t]
                data = rng.integers(0, 256, size=(w.shape[0], w.shape[1] // block * size),
                                    dtype=np.uint8)
            writer.add_tensor(gname, data, raw_dtype=t)
    for name, (array, raw_dtype) in (extra or {}).items():
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
