"""The built-in demo checkpoint: a tiny Llama with random weights and a locally trained tokenizer.

It lets `tokenfactory serve` / `generate` / the tests run end to end with no download. The
directory is a regular Hugging Face checkpoint (config.json, generation_config.json,
model.safetensors with HF tensor names, tokenizer files), written without `transformers`.

Sizes: hidden 256, 4 layers, 4 query heads / 2 KV heads (head_dim 64), MLP 688, vocab 8192:
about 7M parameters (14 MB in bf16), so a 20K-token prefill takes seconds on two CPU cores.
Embedding and LM-head weights get a large init std so the logits are peaked and greedy/sampled
outputs look decisive rather than uniform noise. The weights are random: the text is gibberish.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from tokenfactory.text.demo_tokenizer import EOS_TOKEN, train_demo_tokenizer

__all__ = ["build_demo_checkpoint", "default_demo_dir", "ensure_demo_checkpoint", "DEMO_CONFIG"]

DEMO_VERSION = "demo-v1"

# config.json minus the token ids and vocabulary size, which come from the tokenizer.
DEMO_CONFIG: dict = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "intermediate_size": 688,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rope_theta": 500000.0,
    "rope_scaling": None,
    "rms_norm_eps": 1e-5,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "use_cache": True,
    "torch_dtype": "bfloat16",
}
_LINEAR_STD = 0.02
_EMBED_STD = 1.0
_LM_HEAD_STD = 0.5
_README = """# tokenfactory demo checkpoint ({version})

Random weights, for demos and tests. This model has never been trained: its output is
gibberish. It exists so the whole serving stack (tokenizer, chat template, tool calls, engine,
KV cache, APIs) can run with no download.

- Architecture: LlamaForCausalLM, hidden {hidden}, {layers} layers, {heads} heads / {kv} KV heads,
  vocabulary {vocab} (byte-level BPE trained locally on a generated corpus).
- Chat template: ChatML with Hermes-style tools (`<tool_call>` ... `</tool_call>`).
- Built by `tokenfactory.model.demo.build_demo_checkpoint(seed={seed})`.
"""


def _random_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden = config["hidden_size"]
    head_dim = config["head_dim"]
    q_out = config["num_attention_heads"] * head_dim
    kv_out = config["num_key_value_heads"] * head_dim
    inter = config["intermediate_size"]
    vocab = config["vocab_size"]

    def normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal((vocab, hidden), _EMBED_STD)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        # nn.Linear weights are (out_features, in_features)
        w[p + "self_attn.q_proj.weight"] = normal((q_out, hidden), _LINEAR_STD)
        w[p + "self_attn.k_proj.weight"] = normal((kv_out, hidden), _LINEAR_STD)
        w[p + "self_attn.v_proj.weight"] = normal((kv_out, hidden), _LINEAR_STD)
        w[p + "self_attn.o_proj.weight"] = normal((hidden, q_out), _LINEAR_STD)
        w[p + "mlp.gate_proj.weight"] = normal((inter, hidden), _LINEAR_STD)
        w[p + "mlp.up_proj.weight"] = normal((inter, hidden), _LINEAR_STD)
        w[p + "mlp.down_proj.weight"] = normal((hidden, inter), _LINEAR_STD)
        w[p + "input_layernorm.weight"] = ones(hidden)
        w[p + "post_attention_layernorm.weight"] = ones(hidden)
    w["model.norm.weight"] = ones(hidden)
    w["lm_head.weight"] = normal((vocab, hidden), _LM_HEAD_STD)
    return w


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def build_demo_checkpoint(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write the complete demo checkpoint into `out_dir` (created if needed); return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_demo_tokenizer(out)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    config = {
        **DEMO_CONFIG,
        "vocab_size": tokenizer.vocab_size,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": eos_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tokenfactory_note": "random weights, for demos and tests",
    }
    _write_json(out / "config.json", config)
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": [eos_id], "pad_token_id": tokenizer.pad_token_id},
    )
    save_file(_random_weights(config, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "README.md").write_text(
        _README.format(
            version=DEMO_VERSION, hidden=config["hidden_size"], layers=config["num_hidden_layers"],
            heads=config["num_attention_heads"], kv=config["num_key_value_heads"], vocab=config["vocab_size"],
            seed=seed,
        ),
        encoding="utf-8",
    )
    return out


def default_demo_dir() -> Path:
    """`$XDG_CACHE_HOME/tokenfactory/demo-v1`, or `~/.cache/tokenfactory/demo-v1`."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "tokenfactory" / DEMO_VERSION


_REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                   "tokenizer_config.json")


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in _REQUIRED_FILES)


def ensure_demo_checkpoint(path: str | Path | None = None) -> Path:
    """Return the demo checkpoint directory, building it the first time.

    The build happens in a temporary sibling directory that is renamed into place, so a crash
    or a concurrent builder never leaves a half-written checkpoint behind.
    """
    target = Path(path) if path is not None else default_demo_dir()
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build_demo_checkpoint(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):  # a stale, incomplete directory: replace it
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
            # else another process won the race; its checkpoint is identical
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
