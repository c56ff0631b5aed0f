"""Checkpoint loading: sharded files, dtypes, and one-line errors naming the file."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tokenfactory.model.config import ModelLoadError
from tokenfactory.model.loader import load_model, resolve_dtype
from tokenfactory.model.runner import TorchExecutor
from tokenfactory.engine.executor import Batch, ScheduledChunk
from tokenfactory.engine.request import Request
from tokenfactory.engine.sampling_params import SamplingParams


def _copy(checkpoint, tmp_path, name="llama_gqa"):
    src, hf = checkpoint(name)
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst, hf


def _load_error(path, **kw) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def _prefill_logits(ex: TorchExecutor, ids: list[int]) -> torch.Tensor:
    ex.initialize_cache(8, 16)
    req = Request("r", ids, SamplingParams())
    req.block_ids = list(range(len(ids) // 16 + 1))
    return ex.forward_logits(Batch([ScheduledChunk(req, 0, len(ids), True)], 16))[0]


def test_sharded_checkpoint_loads(checkpoint, tmp_path):
    _, hf = checkpoint("qwen2_tied")
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    ours = _prefill_logits(TorchExecutor(tmp_path, dtype="float32"), ids)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_missing_safetensors(checkpoint, tmp_path):
    d, _ = _copy(checkpoint, tmp_path)
    (d / "model.safetensors").unlink()
    msg = _load_error(d)
    assert str(d) in msg and "safetensors" in msg


def test_missing_shard(checkpoint, tmp_path):
    _, hf = checkpoint("llama_gqa")
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    msg = _load_error(tmp_path)
    assert shard.name in msg and "missing" in msg


@pytest.mark.parametrize("keep", [0.5, 0.0001])
def test_truncated_safetensors(checkpoint, tmp_path, keep):
    d, _ = _copy(checkpoint, tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:max(int(len(data) * keep), 4)])
    msg = _load_error(d)
    assert "model.safetensors" in msg


def test_garbage_safetensors(checkpoint, tmp_path):
    d, _ = _copy(checkpoint, tmp_path)
    (d / "model.safetensors").write_bytes(b"\xff" * 64)
    assert "model.safetensors" in _load_error(d)


def test_shape_mismatch(checkpoint, tmp_path):
    d, _ = _copy(checkpoint, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    msg = _load_error(d)
    assert "model.safetensors" in msg and "shape" in msg and "gate_proj" in msg


def test_missing_tensor(checkpoint, tmp_path):
    d, _ = _copy(checkpoint, tmp_path)
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    msg = _load_error(d)
    assert "model.safetensors" in msg and "model.layers.1.mlp.up_proj.weight" in msg


def test_unknown_architecture(checkpoint, tmp_path):
    d, _ = _copy(checkpoint, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    msg = _load_error(d)
    assert "config.json" in msg and "FalconForCausalLM" in msg and "Qwen3ForCausalLM" in msg


def test_missing_config(checkpoint, tmp_path):
    d, _ = _copy(checkpoint, tmp_path)
    (d / "config.json").unlink()
    assert "config.json not found" in _load_error(d)


def test_dtype_resolution(checkpoint, tmp_path, caplog):
    d, _ = _copy(checkpoint, tmp_path)
    from tokenfactory.model.config import load_model_config
    cfg = load_model_config(d)
    assert resolve_dtype(None, cfg) == torch.float32          # float32 checkpoints stay float32
    cfg.torch_dtype = "bfloat16"
    assert resolve_dtype(None, cfg) == torch.bfloat16         # the checkpoint's own dtype
    assert resolve_dtype("float32", cfg) == torch.float32
    with caplog.at_level(logging.WARNING):
        assert resolve_dtype("float16", cfg, "cpu") == torch.bfloat16  # never fp16 on CPU
    assert "float16" in caplog.text
    with pytest.raises(ValueError):
        resolve_dtype("int8", cfg)
    model = load_model(d, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
