"""The real SmolLM2 with its linears run as stored (QuantLinear) against the same weights
dequantized (``quantization="none"``): greedy tokens, perplexity and KL divergence on real text.

Both models run the same paged attention and differ in the linears only. QuantLinear is forced
onto its native kernels for every row count. Served in bfloat16 that is the GEMM kernel on the
packed blocks (what the server runs for prefill and decode), which rounds activations to int8
per block of 32 as llama.cpp does; in float32 the exact kernel. The reference is the dequantized model in float32 (the bfloat16 dense model is
itself a rounding of it). Q8_0 and Q4_0 files are written here from the Q4_1 file's weights
with the ``gguf`` package's quantizer.

llama.cpp's own numbers for the same rounding (llama-perplexity on textwrap.py, 9 chunks of
512, the Q4_1 file against an F32 file dequantized from it by llama-quantize, see
docs/quantization.md): perplexity +0.034% +- 0.16%, mean KL divergence 0.0027, same top token
97.0%.
"""
from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from tokenfactory.model.default import default_model_path
from tokenfactory.model.kernels import quant
from tokenfactory.model.layers import AttentionMetadata, PrefillSeq
from tokenfactory.model.loader import load_model
from tokenfactory.model.quant_linear import QuantLinear
from tokenfactory.text.gguf_tokenizer import read_gguf_tokenizer

pytestmark = pytest.mark.skipif(quant.library() is None, reason="native kernels unavailable")

PROMPTS = [
    "The history of the Roman Empire began",
    "def quicksort(items):\n    if len(items) <= 1:\n        return items\n",
    "La Tour Eiffel est un monument situé à Paris. Elle a été construite",
    "<|im_start|>user\nName three primary colors.<|im_end|>\n<|im_start|>assistant\n",
]


def prefill_hidden(model, ids: list[int]) -> torch.Tensor:
    """Final hidden states (T, hidden) of one prefill of ``ids`` over a fresh paged cache."""
    cfg, bs, n = model.config, 16, len(ids)
    pages = (n + bs - 1) // bs
    dtype = model.embed_tokens.weight.dtype
    for layer in model.layers:
        shape = (cfg.num_kv_heads, pages, bs, cfg.head_dim)
        layer.self_attn.k_cache = torch.zeros(shape, dtype=dtype)
        layer.self_attn.v_cache = torch.zeros(shape, dtype=dtype)
    meta = AttentionMetadata(block_size=bs, slot_mapping=torch.arange(n),
                             prefills=[PrefillSeq(0, n, 0, torch.arange(pages))])
    with torch.no_grad():
        return model(torch.tensor(ids), torch.arange(n), meta)


def logits(model, ids: list[int]) -> torch.Tensor:
    """(T, vocab) float32: the quantized lm_head's own float32 output, or for a dense head
    the float32 product (so neither side is rounded to bfloat16)."""
    hidden = prefill_hidden(model, ids)
    head = model.lm_head
    with torch.no_grad():
        if isinstance(head, QuantLinear):
            return head(hidden).float()
        return hidden.float() @ head.weight.float().T


def force_native(model) -> int:
    count = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.native_max_rows = 1 << 30
            count += 1
    return count


def requantized_file(src: Path, dst: Path, qtype) -> Path:
    """``src``'s architecture metadata and tensors, every 2-D weight requantized to
    ``qtype`` from its dequantized values (rows in the file's own order)."""
    reader = gguf.GGUFReader(src)
    arch = str(reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(str(dst), arch)
    for key, field in reader.fields.items():
        if key.startswith(arch + ".") and len(field.types) == 1:
            value = field.contents()
            if isinstance(value, float):
                writer.add_float32(key, value)
            elif isinstance(value, int):
                writer.add_uint32(key, value)
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        dense = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        if len(shape) == 2:
            writer.add_tensor(t.name, gguf.quants.quantize(dense, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, dense)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


HELD = 512   # held-text tokens; the second half is scored, as llama-perplexity scores a chunk


@pytest.fixture(scope="module")
def texts() -> list[list[int]]:
    """Token ids: 512 tokens of textwrap.py (held text, perplexity), then the prompts."""
    tok = read_gguf_tokenizer(default_model_path()).backend
    held = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    return [tok.encode(held).ids[:HELD]] + [tok.encode(p).ids for p in PROMPTS]


@pytest.fixture(scope="module", params=["Q4_1", "Q8_0", "Q4_0"])
def runs(request, texts, tmp_path_factory):
    """For the real Q4_1 file and Q8_0 / Q4_0 files requantized from it: (name, {dtype:
    (logits as stored, logits dequantized) per text}) for bfloat16 and float32 (QuantLinear
    takes float32 activations as two bfloat16 halves through the exact kernel)."""
    path = default_model_path()
    if request.param != "Q4_1":
        path = requantized_file(path, tmp_path_factory.mktemp("q") / f"{request.param}.gguf",
                                getattr(gguf.GGMLQuantizationType, request.param))
    out = {}
    for dtype in ("bfloat16", "float32"):
        quantized = load_model(path, quantization="gguf", dtype=dtype)
        assert force_native(quantized) == 1 + 4 * quantized.config.num_layers
        kinds = {m.kind for m in quantized.modules() if isinstance(m, QuantLinear)}
        assert kinds == ({"q4_1", "q8_0"} if request.param == "Q4_1" else {request.param.lower()})
        ours = [logits(quantized, ids) for ids in texts]
        del quantized
        if dtype == "float32":
            dense = load_model(path, quantization="none", dtype=dtype)
            assert not any(isinstance(m, QuantLinear) for m in dense.modules())
            out["reference"] = [logits(dense, ids) for ids in texts]
            del dense
        out[dtype] = ours
    return request.param, out


def scored(lg: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (HELD / 2 - 1, vocab) of the held text's second half."""
    return torch.log_softmax(lg[HELD // 2 - 1:HELD - 1].float(), -1)


def perplexity(lg: torch.Tensor, ids: list[int]) -> float:
    return math.exp(torch.nn.functional.cross_entropy(
        scored(lg), torch.tensor(ids[HELD // 2:HELD])).item())


def test_greedy_tokens_match_dequantized(runs):
    """Served in bfloat16 (int8 activations): at every position of the texts, the next token
    greedy decoding would pick is the dequantized float32 model's on >= 95% of positions
    (llama.cpp's own Q4_1 execution: 97.0%; the dense bfloat16 model itself ~98%)."""
    name, out = runs
    ours, ref = out["bfloat16"], out["reference"]
    agree = sum(int((o.argmax(-1) == r.argmax(-1)).sum()) for o, r in zip(ours, ref))
    total = sum(len(r) for r in ref)
    print(f"{name}: greedy agreement {agree}/{total}")
    assert agree >= 0.95 * total


def test_perplexity_matches_dequantized(runs, texts):
    """Perplexity of the second 256 of 512 tokens of textwrap.py against the dequantized
    float32 model. float32 (exact kernel): same numbers, different kernel -- within 0.01%
    (the issue's bound is 0.1%; measured ~1e-6). bfloat16 (int8 activations): a real
    rounding of every activation, measured as llama.cpp measures its own (see the module
    docstring): mean KL divergence <= 0.006 (about twice llama.cpp's 0.0027: the bfloat16
    residual stream adds its own), and the log perplexity ratio within 0.1% or three standard
    errors of the per-token log-probability differences, whichever is larger (256 tokens: a
    standard error of ~0.4%, so a bound of ~1.2%; measured +0.04% on Q4_1, +1.2% on Q8_0)."""
    name, out = runs
    ids, ref = texts[0], out["reference"][0]
    p_q, p_d = perplexity(out["float32"][0], ids), perplexity(ref, ids)
    base, ours = scored(ref), scored(out["bfloat16"][0])
    kld = float((base.exp() * (base - ours)).sum(-1).mean())
    target = torch.tensor(ids[HELD // 2:HELD])[:, None]
    diff = (base.gather(1, target) - ours.gather(1, target)).double().flatten()  # nll_q - nll_d
    se = float(diff.std() / math.sqrt(diff.numel()))
    print(f"{name}: perplexity as stored {p_q:.5f} (float32), {math.exp(float(diff.mean())) * p_d:.4f} "
          f"(bfloat16, int8 activations); dequantized float32 {p_d:.5f}; bfloat16 log ratio "
          f"{float(diff.mean()):+.5f} +- {se:.5f}; KL divergence {kld:.5f}")
    assert abs(p_q - p_d) <= 1e-4 * p_d   # the issue asks 0.1%; measured ~1e-6
    assert abs(float(diff.mean())) <= max(1e-3, 3 * se)
    assert kld <= 0.006
    assert p_d < 25   # the model reads the text (a uniform guess: 49,152)


def test_int8_at_load_keeps_the_model(texts):
    """``quantization="int8"``: the layers' linears become per-channel int8 (embedding and
    lm_head stay bfloat16); greedy tokens and perplexity stay close to the bf16 weights'
    (a real rounding of the weights this time, so looser bounds than the GGUF kinds)."""
    path = default_model_path()
    int8 = load_model(path, quantization="int8")
    quantized = [m for m in int8.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 4 * int8.config.num_layers
    assert {m.kind for m in quantized} == {"int8"} and not isinstance(int8.lm_head, QuantLinear)
    force_native(int8)
    ours = [logits(int8, ids) for ids in texts]
    del int8, quantized
    dense = load_model(path, quantization="none")
    ref = [logits(dense, ids) for ids in texts]
    agree = sum(int((o.argmax(-1) == r.argmax(-1)).sum()) for o, r in zip(ours, ref))
    total = sum(len(r) for r in ref)
    p_q, p_d = perplexity(ours[0], texts[0]), perplexity(ref[0], texts[0])
    print(f"int8: greedy agreement {agree}/{total}, perplexity {p_q:.4f} vs {p_d:.4f}")
    assert agree >= 0.9 * total
    assert abs(p_q - p_d) <= 0.01 * p_d


def test_llm_quantization_argument_reaches_the_executor():
    """``LLM(..., quantization="gguf")`` serves the file's Q4_1 blocks as stored (QuantLinear
    modules in the executor's model) and answers greedily as the dequantized model does."""
    from tokenfactory.engine.llm import LLM
    from tokenfactory.engine.sampling_params import SamplingParams
    texts = {}
    for q in ("gguf", "none"):
        llm = LLM(str(default_model_path()), dtype="float32", quantization=q,
                  max_model_len=512, num_kv_blocks=64)
        kinds = {type(m).__name__ for m in llm.engine.executor.model.modules()}
        assert ("QuantLinear" in kinds) == (q == "gguf")
        ids = llm.tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}],
            add_generation_prompt=True)
        out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
        texts[q] = out[0].outputs[0].token_ids
    assert texts["gguf"] == texts["none"]
