"""Random Llama-shaped checkpoints for benchmarks, built locally (nothing is downloaded).

Sizes: "100m" (~95M parameters: hidden 768, 12 layers, GQA 12:4, SwiGLU 2304, vocab 8192) is the
benchmark default; "tiny" (~1M plus embeddings) is for tests. Weights are N(0, 0.02) with unit
norms, stored as safetensors; the tokenizer is the project's demo byte-level BPE, trained locally.
Built once into ~/.cache/tokenfactory/bench-models/<size>-<dtype>/ (override with
TOKENFACTORY_CACHE).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

SIZES = {
    "100m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                 intermediate_size=2304),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128),
}


def cache_dir() -> Path:
    return Path(os.environ.get("TOKENFACTORY_CACHE", Path.home() / ".cache" / "tokenfactory"))


def _tokenizer_into(out: Path) -> None:
    shared = cache_dir() / "bench-models" / "_tokenizer"
    if not (shared / "tokenizer.json").exists():
        from tokenfactory.text.demo_tokenizer import train_demo_tokenizer
        tmp = shared.with_name("_tokenizer.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        train_demo_tokenizer(tmp)
        tmp.rename(shared)
    for f in shared.iterdir():
        shutil.copy(f, out / f.name)


def build_bench_checkpoint(size: str = "100m", dtype: str = "bfloat16", out_dir: str | Path | None = None,
                           seed: int = 0, max_position_embeddings: int = 32768) -> Path:
    """Build (once) and return the directory of a random checkpoint of the given size."""
    import torch
    from safetensors.torch import save_file

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    out = Path(out_dir) if out_dir else cache_dir() / "bench-models" / f"llama-{size}-{dtype}"
    if (out / "config.json").exists() and (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _tokenizer_into(tmp)
    tok = json.loads((tmp / "tokenizer_config.json").read_text())
    vocab = json.loads((tmp / "tokenizer.json").read_text())
    vocab_size = len(vocab["model"]["vocab"]) + sum(
        1 for t in vocab.get("added_tokens", []) if t["content"] not in vocab["model"]["vocab"])
    ids = {t["content"]: t["id"] for t in vocab.get("added_tokens", [])}
    shape = SIZES[size]
    h, n_layers = shape["hidden_size"], shape["num_hidden_layers"]
    n_heads, n_kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim, inter = h // n_heads, shape["intermediate_size"]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab_size, "hidden_size": h, "intermediate_size": inter,
        "num_hidden_layers": n_layers, "num_attention_heads": n_heads, "num_key_value_heads": n_kv,
        "head_dim": head_dim, "hidden_act": "silu", "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": False, "torch_dtype": dtype, "initializer_range": 0.02,
        "bos_token_id": ids.get(tok.get("bos_token")), "eos_token_id": ids.get(tok.get("eos_token")),
        "pad_token_id": ids.get(tok.get("pad_token")),
    }
    g = torch.Generator().manual_seed(seed)
    torch_dtype = getattr(torch, dtype)

    def normal(*shape_: int) -> torch.Tensor:
        return (torch.randn(*shape_, generator=g) * 0.02).to(torch_dtype)

    ones = lambda n: torch.ones(n, dtype=torch_dtype)  # noqa: E731
    w = {"model.embed_tokens.weight": normal(vocab_size, h), "model.norm.weight": ones(h),
         "lm_head.weight": normal(vocab_size, h)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = ones(h)
        w[p + "post_attention_layernorm.weight"] = ones(h)
        w[p + "self_attn.q_proj.weight"] = normal(n_heads * head_dim, h)
        w[p + "self_attn.k_proj.weight"] = normal(n_kv * head_dim, h)
        w[p + "self_attn.v_proj.weight"] = normal(n_kv * head_dim, h)
        w[p + "self_attn.o_proj.weight"] = normal(h, n_heads * head_dim)
        w[p + "mlp.gate_proj.weight"] = normal(inter, h)
        w[p + "mlp.up_proj.weight"] = normal(inter, h)
        w[p + "mlp.down_proj.weight"] = normal(h, inter)
    save_file(w, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
         "pad_token_id": config["pad_token_id"], "do_sample": False}, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def model_shape(model_dir: str | Path) -> dict:
    """Parameter count, weight bytes and KV bytes per token from a Llama-style config.json."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    h, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    n_heads = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads", n_heads)
    hd = cfg.get("head_dim") or h // n_heads
    inter, vocab = cfg["intermediate_size"], cfg["vocab_size"]
    per_layer = h * n_heads * hd * 2 + 2 * h * n_kv * hd + 3 * h * inter + 2 * h
    embed = vocab * h
    lm_head = 0 if cfg.get("tie_word_embeddings") else vocab * h
    params = L * per_layer + embed + lm_head + h
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    bpe = {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 4)
    return {"params": params, "params_no_embed": params - embed, "params_layers": L * per_layer, "dtype": dtype, "bytes_per_param": bpe,
            "num_layers": L, "hidden_size": h, "kv_bytes_per_token": 2 * L * n_kv * hd * bpe,
            "attn_dim": n_heads * hd}
