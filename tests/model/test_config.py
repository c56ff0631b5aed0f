"""config.json parsing: both RoPE/dtype dialects, architecture switches, clear errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from tokenfactory.engine.executor import Batch, ScheduledChunk
from tokenfactory.engine.request import Request
from tokenfactory.engine.sampling_params import SamplingParams
from tokenfactory.model.config import ModelLoadError, load_model_config, parse_model_config
from tokenfactory.model.runner import TorchExecutor


def _legacy_form(cfg: dict) -> dict:
    """Rewrite a transformers>=5 config into the published-checkpoint dialect."""
    cfg = dict(cfg)
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    cfg["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    return cfg


def test_both_config_forms_give_same_model(checkpoint, tmp_path):
    src, _ = checkpoint("llama31")
    modern = json.loads((src / "config.json").read_text())
    assert "rope_parameters" in modern and "rope_scaling" not in modern
    legacy_dir = tmp_path / "legacy"
    shutil.copytree(src, legacy_dir)
    legacy = _legacy_form(modern)
    (legacy_dir / "config.json").write_text(json.dumps(legacy))

    a, b = load_model_config(src), load_model_config(legacy_dir)
    assert a == b
    assert a.rope.rope_type == "llama3" and a.rope.factor == 8.0
    assert a.rope.theta == 500000.0 and a.rope.original_max_position_embeddings == 64
    assert a.torch_dtype == "float32"

    ids = torch.tensor([[5, 9, 200, 17, 3, 88, 41, 7, 300, 12] * 8])  # 80 tokens > 64
    outs = []
    for d in (src, legacy_dir):
        ex = TorchExecutor(d, dtype="float32")
        ex.initialize_cache(32, 16)
        req = Request("r", ids[0].tolist(), SamplingParams())
        req.block_ids = list(range(5))
        outs.append(ex.forward_logits(Batch([ScheduledChunk(req, 0, 80, True)], 16))[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_rope_type_key_spellings():
    base = dict(architectures=["LlamaForCausalLM"], hidden_size=64, num_attention_heads=4,
                num_hidden_layers=2, intermediate_size=128, vocab_size=512,
                max_position_embeddings=4096)
    a = parse_model_config({**base, "rope_theta": 1e4,
                            "rope_scaling": {"type": "linear", "factor": 2.0}})
    b = parse_model_config({**base, "rope_scaling": {"rope_type": "linear", "factor": 2.0},
                            "rope_theta": 1e4})
    c = parse_model_config({**base, "rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                        "rope_theta": 1e4}})
    d = parse_model_config({**base, "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}})
    assert a.rope == b.rope == c.rope == d.rope
    assert a.max_model_len == 8192  # linear scaling extends the context like vLLM
    yarn = parse_model_config({**base, "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}})
    assert yarn.rope.original_max_position_embeddings == 1024 and yarn.max_model_len == 4096
    assert parse_model_config(base).head_dim == 16 and parse_model_config(base).num_kv_heads == 4
    assert parse_model_config({**base, "head_dim": 32}).head_dim == 32


def test_architecture_switches():
    base = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=4, num_key_value_heads=1,
                intermediate_size=128, vocab_size=512, rope_theta=1e6, torch_dtype="bfloat16")
    qwen2 = parse_model_config({**base, "architectures": ["Qwen2ForCausalLM"],
                                "sliding_window": 32, "use_sliding_window": False})
    assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.sliding_windows == [None] * 4
    assert qwen2.torch_dtype == "bfloat16"
    qwen2w = parse_model_config({**base, "architectures": ["Qwen2ForCausalLM"],
                                 "sliding_window": 32, "use_sliding_window": True,
                                 "max_window_layers": 2})
    assert qwen2w.sliding_windows == [None, None, 32, 32]
    qwen3 = parse_model_config({**base, "architectures": ["Qwen3ForCausalLM"]})
    assert qwen3.qk_norm and not qwen3.qkv_bias
    mistral = parse_model_config({**base, "architectures": ["MistralForCausalLM"],
                                  "sliding_window": 4096})
    assert mistral.sliding_windows == [4096] * 4 and mistral.sliding_window == 4096
    llama = parse_model_config({**base, "architectures": ["LlamaForCausalLM"],
                                "attention_bias": True})
    assert llama.qkv_bias and llama.o_bias and not llama.qk_norm


def _one_line_error(path) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model_config(path)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_config_errors(tmp_path):
    assert "config.json not found" in _one_line_error(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    msg = _one_line_error(tmp_path)
    assert "config.json" in msg and "invalid JSON" in msg
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    msg = _one_line_error(tmp_path)
    assert "config.json" in msg and "GPT2LMHeadModel" in msg and "LlamaForCausalLM" in msg
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["LlamaForCausalLM"], "hidden_size": 64}))
    msg = _one_line_error(tmp_path)
    assert "config.json" in msg and "num_attention_heads" in msg
    assert "does not exist" in _one_line_error(tmp_path / "nope")


def _hf_windows(hf_config) -> list:
    """Per-layer windows as transformers itself derives them (its ``layer_types``)."""
    return [hf_config.sliding_window if t == "sliding_attention" else None
            for t in hf_config.layer_types]


@pytest.mark.parametrize("make", [
    lambda t: t.Qwen2Config(num_hidden_layers=6, sliding_window=32, use_sliding_window=True,
                            max_window_layers=2),
    lambda t: t.Qwen2Config(num_hidden_layers=30, sliding_window=32, use_sliding_window=True),
    lambda t: t.Qwen2Config(num_hidden_layers=6, sliding_window=32),   # use_sliding_window off
    lambda t: t.Qwen3Config(num_hidden_layers=4, sliding_window=8, use_sliding_window=True,
                            max_window_layers=1),
    lambda t: t.GptOssConfig(num_hidden_layers=4),
])
@pytest.mark.parametrize("keep_layer_types", [True, False])
def test_sliding_windows_match_transformers(make, keep_layer_types):
    """The one parser against transformers' own config classes, with and without the
    ``layer_types`` list (published checkpoints often lack it, so the rule must derive it)."""
    import transformers

    from tokenfactory.model_description import describe_hf_config
    hf = make(transformers)
    raw = hf.to_dict()
    if not keep_layer_types:
        raw.pop("layer_types", None)
    assert list(describe_hf_config(raw).layer_windows) == _hf_windows(hf)


def test_model_and_economics_share_one_description(tmp_path):
    """model/config.py and the economics catalog read one config.json into the same shape."""
    from tokenfactory.economics import kv_bytes_for_context, kv_bytes_per_token, load_model
    cfg = dict(architectures=["Qwen2ForCausalLM"], hidden_size=64, num_attention_heads=4,
               num_hidden_layers=6, num_key_value_heads=2, intermediate_size=128,
               vocab_size=512, sliding_window=16, use_sliding_window=True, max_window_layers=4,
               max_position_embeddings=256)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = load_model_config(tmp_path).description
    spec = load_model(str(tmp_path))
    assert model.layer_windows == spec.layer_windows == (None,) * 4 + (16,) * 2
    assert model.kv_bytes_per_token("bf16") == kv_bytes_per_token(spec) == 6 * 2 * 2 * 16 * 2
    assert kv_bytes_for_context(model, 100) == kv_bytes_for_context(spec, 100)
    assert (model.num_heads, model.num_kv_heads, model.head_dim) == (4, 2, 16)


def test_description_prices_the_kv_cache_the_executor_allocates(checkpoint):
    """KV bytes per token from the shared description match the pages TorchExecutor sizes."""
    src, _ = checkpoint("llama31")
    desc = load_model_config(src).description
    ex = TorchExecutor(src, dtype="float32")
    assert ex.kv_cache_bytes_per_block(16) == desc.kv_bytes_per_token("float32") * 16
