"""The demo tokenizer and the demo checkpoint (random weights) load in transformers and run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenfactory.model.demo import DEMO_CONFIG, build_demo_checkpoint, default_demo_dir, ensure_demo_checkpoint
from tokenfactory.text.demo_tokenizer import DEMO_TOOL_MARKERS, demo_chat_template, train_demo_tokenizer
from tokenfactory.text.tokenizer import Tokenizer


def test_demo_tokenizer_files(demo_tokenizer_dir: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        assert (demo_tokenizer_dir / name).is_file()
    config = json.loads((demo_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == demo_chat_template() == (demo_tokenizer_dir / "chat_template.jinja").read_text()


def test_demo_tokenizer_is_deterministic(demo_tokenizer_dir: Path, tmp_path: Path) -> None:
    tok = train_demo_tokenizer(tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (demo_tokenizer_dir / "tokenizer.json").read_bytes()
    assert tok.vocab_size == 8192


def test_demo_tokenizer_compresses_english_and_json(demo_tokenizer: Tokenizer) -> None:
    text = 'The server reads the next block quickly. {"name": "get_weather", "arguments": {"location": "Paris"}}'
    assert len(demo_tokenizer.encode(text)) < len(text) / 2.5
    for marker in DEMO_TOOL_MARKERS:
        assert len(demo_tokenizer.encode(marker)) == 1


def test_demo_tokenizer_small_vocab(tmp_path: Path) -> None:
    tok = train_demo_tokenizer(tmp_path, vocab_size=1024)
    assert tok.vocab_size == 1024
    assert tok.decode(tok.encode("héllo 😀 世界")) == "héllo 😀 世界"


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_checkpoint(tmp_path_factory.mktemp("demo_ckpt"), seed=0)


def test_checkpoint_files_and_config(demo_checkpoint: Path) -> None:
    config = json.loads((demo_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == 8192 and config["hidden_size"] == 256 and config["num_key_value_heads"] == 2
    assert config["torch_dtype"] == "bfloat16" and config["tie_word_embeddings"] is False
    tok = Tokenizer.from_dir(demo_checkpoint)
    gen = json.loads((demo_checkpoint / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.token_to_id("<|im_end|>")]
    assert tok.eos_token_ids == {tok.token_to_id("<|im_end|>")}
    assert "random weights, for demos and tests" in (demo_checkpoint / "README.md").read_text().lower()


def test_checkpoint_tensor_names_and_shapes(demo_checkpoint: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(demo_checkpoint / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [128, 256]
        assert f.get_slice("lm_head.weight").get_shape() == [8192, 256]
    assert len(keys) == 3 + 9 * DEMO_CONFIG["num_hidden_layers"]


def test_checkpoint_is_seeded(demo_checkpoint: Path) -> None:
    from safetensors.torch import load_file

    from tokenfactory.model.demo import _random_weights

    config = json.loads((demo_checkpoint / "config.json").read_text())
    ours = load_file(str(demo_checkpoint / "model.safetensors"))
    assert _random_weights(config, 0)["lm_head.weight"].equal(ours["lm_head.weight"])
    assert not _random_weights(config, 1)["lm_head.weight"].equal(ours["lm_head.weight"])


def test_transformers_loads_and_generates(demo_checkpoint: Path) -> None:
    import transformers
    import torch

    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(demo_checkpoint), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tok = Tokenizer.from_dir(demo_checkpoint)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hello!"}])
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        logits = model(ids).logits[0, -1].float()
    assert out.shape[1] == ids.shape[1] + 8 or int(out[0, -1]) in tok.eos_token_ids
    assert torch.softmax(logits, -1).max() > 0.05  # peaked, not uniform (1/8192)


def test_default_dir_and_ensure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_demo_dir() == tmp_path / "tokenfactory" / "demo-v1"
    path = ensure_demo_checkpoint()
    assert path == default_demo_dir() and (path / "model.safetensors").is_file()
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_checkpoint() == path and (path / "model.safetensors").stat().st_mtime_ns == mtime
    leftovers = [p.name for p in (tmp_path / "tokenfactory").iterdir() if p.name != "demo-v1"]
    assert leftovers == []
