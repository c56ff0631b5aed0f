"""load_model(quantization=...) on tiny GGUF files (written as llama.cpp lays them out) and
QuantLinear's paths: which linears keep their blocks, q/k rows in Hugging Face order, biases,
mixed tensor types, the dequantize fallback, and the errors."""
from __future__ import annotations

import gguf
import pytest
import torch

from tokenfactory.model.kernels import quant
from tokenfactory.model.loader import load_model
from tokenfactory.model.quant_linear import QuantLinear

from .conftest import build_hf_model, write_gguf

Q = gguf.GGMLQuantizationType
pytestmark = pytest.mark.skipif(quant.library() is None, reason="native kernels unavailable")


def linears(model) -> dict[str, torch.nn.Module]:
    out = {"lm_head": model.lm_head}
    for i, layer in enumerate(model.layers):
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                     "mlp.down_proj"):
            out[f"layers.{i}.{name}"] = layer.get_submodule(name)
    return out


@pytest.mark.parametrize("name,arch,qtype", [("llama_gqa", "llama", Q.Q4_1),
                                             ("qwen2_tied", "qwen2", Q.Q8_0),
                                             ("llama_mha", "llama", Q.Q4_0)])
def test_blocks_kept_and_equal_to_dequantized(name, arch, qtype, tmp_path):
    """Every linear keeps its blocks (lm_head too, tied or not); the weights are the
    dequantized model's (q/k rows unpermuted, q/k/v and gate/up rows concatenated), and the
    float32 forward of each linear equals the dense one, with qwen2's q/k/v biases."""
    path = write_gguf(tmp_path / "m.gguf", build_hf_model(name), arch, qtype=lambda n, s: qtype)
    quantized = load_model(path, dtype="float32", quantization="gguf")
    dense = load_model(path, dtype="float32", quantization="none")
    ql, dl = linears(quantized), linears(dense)
    assert all(isinstance(m, QuantLinear) and m.kind == qtype.name.lower() for m in ql.values())
    assert not any(isinstance(m, QuantLinear) for m in dl.values())
    assert ql["lm_head"].float_output
    for key, q in ql.items():
        assert torch.equal(q.dequantized(torch.float32), dl[key].weight), key
        assert (q.bias is None) == (dl[key].bias is None), key
        if q.bias is not None:
            assert torch.equal(q.bias, dl[key].bias)
        xin = torch.randn(5, q.in_features)
        ref = torch.nn.functional.linear(xin.double(), dl[key].weight.double(),
                                         None if q.bias is None else q.bias.double())
        for rows in (1, 5):   # native kernel (hi + lo halves); dequantize + matmul
            q.native_max_rows = 1 if rows == 5 else 8
            torch.testing.assert_close(q(xin[:rows]).double(), ref[:rows], rtol=1e-4, atol=1e-4)


def test_mixed_types_stay_dense(tmp_path):
    """A fused parameter whose parts differ in type (attn_v Q8_0 beside Q4_1 q/k, as
    llama.cpp's mixes do) stays dense; the others keep their blocks."""
    def pick(name, shape):
        return Q.Q8_0 if ".attn_v." in name else Q.F32 if "ffn_down" in name else Q.Q4_1

    path = write_gguf(tmp_path / "m.gguf", build_hf_model("llama_gqa"), "llama", qtype=pick)
    model = load_model(path, quantization="gguf")
    for key, m in linears(model).items():
        quantized = not any(s in key for s in ("qkv_proj", "down_proj"))
        assert isinstance(m, QuantLinear) == quantized, key
    assert model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16


def test_bf16_paths_agree(tmp_path):
    """bfloat16 activations: the GEMM kernel on the packed copy and the stored-layout kernel
    (both: exact weights, activations rounded to int8 per block of 32, each moved by at most
    amax / 254 of its block) agree to float32 error; the dequantize + oneDNN path (no packed
    copy, above native_max_rows: weights rounded to bfloat16) agrees up to those roundings
    (measured: mean 1.4e-3, max ~6e-3 of the largest output; with exact activations the mean
    was < 1e-3)."""
    path = write_gguf(tmp_path / "m.gguf", build_hf_model("llama_gqa"), "llama",
                      qtype=lambda n, s: Q.Q4_1)
    model = load_model(path, quantization="gguf")
    lin = model.layers[1].mlp.gate_up_proj
    assert lin.packed is not None and lin.packed.numel() == lin.weight.numel()
    x = torch.randn(7, lin.in_features).to(torch.bfloat16)
    gemm = lin(x).float()
    lin.packed = None
    lin.native_max_rows = 8
    native = lin(x).float()
    lin.native_max_rows = 0
    onednn = lin(x).float()
    scale = onednn.abs().max().item()
    # float32 sums in another order, each rounded to bfloat16: at most one step apart
    assert ((gemm - native).abs() <= native.abs() * 2 ** -7 + 1e-6 * scale).all()
    assert (gemm != native).float().mean() < 0.05
    print(f"max {(native - onednn).abs().max().item() / scale:.2e}, "
          f"mean {(native - onednn).abs().mean().item() / scale:.2e}")
    assert (native - onednn).abs().max().item() <= 1e-2 * scale
    assert (native - onednn).abs().mean().item() <= 3e-3 * scale


def test_int8_and_errors(checkpoint, tmp_path):
    """int8 at load works on a Hugging Face directory too; "gguf" there means nothing to keep;
    an unknown name is a one-line ValueError."""
    src, _ = checkpoint("llama_gqa")
    int8 = load_model(src, quantization="int8")
    assert {m.kind for m in linears(int8).values() if isinstance(m, QuantLinear)} == {"int8"}
    assert not isinstance(int8.lm_head, QuantLinear)
    plain = load_model(src, quantization="gguf")
    assert not any(isinstance(m, QuantLinear) for m in plain.modules())
    with pytest.raises(ValueError, match="unsupported quantization 'q3'"):
        load_model(src, quantization="q3")
    with pytest.raises(ValueError, match="cannot hold rows"):
        QuantLinear("q4_1", torch.zeros(4, 19, dtype=torch.uint8), 32)
