"""Catalog contents, and Hugging Face config.json files read into the same ModelSpec."""

import json
import subprocess
import sys

import pytest

from tokenfactory.economics import (
    CatalogError, hardware_names, kv_bytes_for_context, kv_bytes_per_token, load_hardware,
    load_model, model_from_hf_config, model_names, param_count,
)
from tokenfactory.economics.catalog import _hardware_table

REQUIRED_HARDWARE = ["a100", "h100", "h200", "b200", "gb200", "mi300x", "mi355x", "tpu-v7",
                     "trainium2", "trainium3", "groq-lpu", "cerebras-wse3", "host"]
REQUIRED_MODELS = ["llama-3-8b", "llama-3-70b", "llama-3-405b", "llama-3.1-70b",
                   "mixtral-8x7b", "qwen3-235b-a22b", "deepseek-v3", "gpt-oss-120b",
                   "llama-4-maverick"]

# Published config.json files (the keys that matter), as shipped on the Hugging Face Hub.
LLAMA3_70B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
    "intermediate_size": 28672, "max_position_embeddings": 8192, "num_attention_heads": 64,
    "num_hidden_layers": 80, "num_key_value_heads": 8, "rope_theta": 500000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256,
}
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "first_k_dense_replace": 3, "hidden_size": 7168, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
    "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "tie_word_embeddings": False,
    "topk_group": 4, "v_head_dim": 128, "vocab_size": 129280,
}
GPT_OSS_120B = {
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": 2880,
    "head_dim": 64, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 18,
    "max_position_embeddings": 131072, "num_attention_heads": 64, "num_experts_per_tok": 4,
    "experts_per_token": 4, "num_hidden_layers": 36, "num_key_value_heads": 8,
    "num_local_experts": 128, "sliding_window": 128, "tie_word_embeddings": False,
    "vocab_size": 201088,
}
LLAMA4_MAVERICK = {
    "architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
    "text_config": {
        "model_type": "llama4_text", "attention_chunk_size": 8192, "head_dim": 128,
        "hidden_size": 5120, "interleave_moe_layer_step": 2, "intermediate_size": 8192,
        "intermediate_size_mlp": 16384, "max_position_embeddings": 1048576,
        "num_attention_heads": 40, "num_experts_per_tok": 1, "num_hidden_layers": 48,
        "num_key_value_heads": 8, "num_local_experts": 128, "vocab_size": 202048,
        "tie_word_embeddings": False,
    },
}
QWEN3_235B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
    "decoder_sparse_step": 1, "head_dim": 128, "hidden_size": 4096,
    "intermediate_size": 12288, "max_position_embeddings": 40960, "max_window_layers": 94,
    "mlp_only_layers": [], "moe_intermediate_size": 1536, "num_attention_heads": 64,
    "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 94,
    "num_key_value_heads": 4, "sliding_window": None, "tie_word_embeddings": False,
    "use_sliding_window": False, "vocab_size": 151936,
}
MIXTRAL = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 32768, "num_attention_heads": 32,
    "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "num_local_experts": 8, "sliding_window": None, "tie_word_embeddings": False,
    "vocab_size": 32000,
}


def test_catalogs_list_every_required_entry_with_a_source():
    assert set(REQUIRED_HARDWARE) <= set(hardware_names())
    assert set(REQUIRED_MODELS) <= set(model_names())
    for name, entry in _hardware_table().items():
        assert entry["source"], name
    for name in model_names():
        assert load_model(name).source


@pytest.mark.parametrize("name", [h for h in REQUIRED_HARDWARE if h != "host"])
def test_hardware_entries_are_complete(name):
    hw = load_hardware(name)
    assert hw.memory_bytes > 0 and hw.bandwidth_bytes_per_s > 0 and hw.tdp_watts > 0
    assert hw.peak_flops("bf16") > 0 and hw.cost_per_hour > 0
    assert hw.flops.get("fp32", 1) <= hw.peak_flops("bf16")  # fp32 never beats bf16 here


def test_aliases_and_precision_fallback():
    assert load_hardware("Ironwood").key == "tpu-v7"
    assert load_model("llama-3.1-405b").name == "llama-3-405b"
    a100 = load_hardware("a100")                  # no fp8 units: fp8 weights run at bf16 rate
    assert a100.peak_flops("fp8") == a100.peak_flops("bf16")
    h100 = load_hardware("h100")
    assert h100.peak_flops("fp8") == pytest.approx(2 * h100.peak_flops("bf16"), rel=1e-3)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(CatalogError, match="valid: a100, h100"):
        load_hardware("h1000")
    with pytest.raises(CatalogError, match="llama-3-70b"):
        load_model("llama-9")


@pytest.mark.parametrize("config, catalog_name", [
    (LLAMA3_70B, "llama-3-70b"), (DEEPSEEK_V3, "deepseek-v3"),
    (GPT_OSS_120B, "gpt-oss-120b"), (LLAMA4_MAVERICK, "llama-4-maverick"),
    (QWEN3_235B, "qwen3-235b-a22b"), (MIXTRAL, "mixtral-8x7b"),
])
def test_hf_config_path_matches_the_catalog(tmp_path, config, catalog_name):
    (tmp_path / "config.json").write_text(json.dumps(config))
    from_file = load_model(str(tmp_path / "config.json"))
    from_dir = load_model(str(tmp_path))
    catalog = load_model(catalog_name)
    for spec in (from_file, from_dir):
        assert kv_bytes_per_token(spec) == kv_bytes_per_token(catalog)
        for context in (100, 4096, 131072):
            assert kv_bytes_for_context(spec, context) == kv_bytes_for_context(catalog, context)
        assert param_count(spec) == param_count(catalog)
        assert spec.layer_windows == catalog.layer_windows
        assert spec.moe_layers == catalog.moe_layers


def test_sliding_window_layers_cap_the_cache():
    oss = load_model("gpt-oss-120b")
    assert oss.layer_windows[:2] == (128, None)
    per_layer = 2 * 8 * 64 * 2
    # 18 sliding layers hold at most 128 tokens, 18 full layers hold all of them
    assert kv_bytes_for_context(oss, 10_000) == (18 * 128 + 18 * 10_000) * per_layer
    assert kv_bytes_for_context(oss, 100) == 36 * 100 * per_layer
    maverick = load_model("llama-4-maverick")
    assert sum(w is None for w in maverick.layer_windows) == 12      # every 4th layer global
    assert len(maverick.moe_layers) == 24 and maverick.moe_layers[0] == 1


def test_mistral_style_sliding_window_from_config():
    spec = model_from_hf_config({
        "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "sliding_window": 4096, "vocab_size": 32000})
    assert kv_bytes_for_context(spec, 100_000) == kv_bytes_for_context(load_model("mistral-7b"),
                                                                        100_000)
    assert kv_bytes_for_context(spec, 100_000) == kv_bytes_for_context(spec, 4096)


def test_bad_configs_give_catalog_errors(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(CatalogError, match="cannot read"):
        load_model(str(bad))
    bad.write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CatalogError, match="lacks"):
        load_model(str(bad))
    with pytest.raises(CatalogError, match="not found"):
        load_model(str(tmp_path / "missing" / "config.json"))


def test_package_imports_without_torch_numpy_or_matplotlib():
    code = ("import sys, tokenfactory.economics, tokenfactory.economics.plan_cli; "
            "print(sorted(m for m in ('torch', 'numpy', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
