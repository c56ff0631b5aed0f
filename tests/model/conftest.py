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
