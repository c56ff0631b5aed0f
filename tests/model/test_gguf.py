"""GGUF loading: the real SmolLM2 Q4_1 file against transformers' own GGUF loader (logits, greedy
tokens, perplexity, a bf16 answer), tiny GGUF files written with ``gguf.GGUFWriter`` for every
architecture and tensor type, and the one-line errors for bad files."""
from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from tokenfactory.engine.executor import Batch, ScheduledChunk
from tokenfactory.engine.request import Request
from tokenfactory.engine.sampling_params import SamplingParams
from tokenfactory.model import gguf as gguf_loader
from tokenfactory.model.config import ModelLoadError
from tokenfactory.model.default import default_model_path
from tokenfactory.model.gguf import SUPPORTED_TYPES, is_gguf_file, load_gguf_config
from tokenfactory.model.loader import checkpoint_names, load_model
from tokenfactory.model.runner import TorchExecutor

from .conftest import build_hf_model, run_engine, write_gguf

Q = gguf.GGMLQuantizationType
BLOCK = 16


# ------------------------------------------------------------------ the real file
@pytest.fixture(scope="module")
def real():
    """(path, transformers tokenizer, transformers float32 model), both from the GGUF file."""
    path = default_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    return path, tok, hf


@pytest.fixture(scope="module")
def ex32(real):
    return TorchExecutor(real[0], dtype="float32", compile=False)


PROMPTS = [
    "The history of the Roman Empire began",
    "def quicksort(items):\n    if len(items) <= 1:\n        return items\n",
    "La Tour Eiffel est un monument situé à Paris. Elle a été construite",
    "量子计算是一种利用量子力学原理进行计算的技术，",
]


N_STEPS = 8   # prefill + 7 decode steps per prompt


@pytest.fixture(scope="module")
def reference(real):
    """Per prompt: (prompt ids, transformers' greedy continuation of N_STEPS tokens, the
    logits transformers computed on the way: prefill (T, V), then one (V,) row per decode
    step). Computed once: the logits test and the engine test both compare against it."""
    _, tok, hf = real
    chat = tok.apply_chat_template([{"role": "user", "content": "Name three primary colors."}],
                                   add_generation_prompt=True, tokenize=False)
    refs = []
    with torch.no_grad():
        for text in PROMPTS + [chat]:
            ids = tok(text)["input_ids"]
            out = hf(torch.tensor([ids]), use_cache=True)
            logits, tokens = [out.logits[0]], [int(out.logits[0, -1].argmax())]
            for _ in range(N_STEPS - 1):
                out = hf(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values,
                         use_cache=True)
                logits.append(out.logits[0, -1])
                tokens.append(int(out.logits[0, -1].argmax()))
            refs.append((ids, tokens, logits))
    return refs


class Pages:
    """A fresh cache on ``ex``, its pages handed out from the top down (block tables are never
    0, 1, 2, ...); ``forward`` gives each chunk's request the pages it needs, then runs it."""

    def __init__(self, ex: TorchExecutor, num_blocks: int = 64):
        ex.initialize_cache(num_blocks, BLOCK)
        self.ex, self.free = ex, list(range(num_blocks))

    def forward(self, chunks: list[ScheduledChunk]) -> list[torch.Tensor]:
        for c in chunks:
            while len(c.request.block_ids) * BLOCK < c.end:
                c.request.block_ids.append(self.free.pop())
        return self.ex.forward_logits(Batch(chunks, BLOCK))


def _max_err(ours: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4 * max(scale, 1.0), f"{what}: max abs err {err:.3g} (logit scale {scale:.3g})"
    return err


def test_prefill_and_decode_logits_match_transformers(reference, ex32):
    """float32: all prompts prefill in one step over paged KV, then decode together on
    transformers' greedy tokens; every position's logits match transformers'."""
    pages = Pages(ex32)
    reqs = [Request(str(i), ids, SamplingParams(temperature=0))
            for i, (ids, _, _) in enumerate(reference)]
    worst = 0.0
    logits = pages.forward([ScheduledChunk(r, 0, r.num_tokens, True) for r in reqs])
    for step in range(N_STEPS):
        for r, ours, (_, tokens, ref) in zip(reqs, logits, reference):
            worst = max(worst, _max_err(ours if step == 0 else ours[0], ref[step],
                                        f"request {r.request_id} step {step}"))
            r.output_token_ids.append(tokens[step])
        if step < N_STEPS - 1:
            logits = pages.forward([ScheduledChunk(r, r.num_tokens - 1, 1, True) for r in reqs])
    print(f"max abs logit difference vs transformers (float32): {worst:.3g}")


def test_greedy_tokens_match_transformers(reference, ex32):
    """The engine (chunked prefill sharing steps with decodes) generates transformers' greedy
    tokens for raw English, code, French, Chinese and a chat-templated prompt."""
    prompts = [ids for ids, _, _ in reference]
    outs, _ = run_engine(ex32, prompts, SamplingParams(temperature=0, max_tokens=N_STEPS),
                         block_size=BLOCK, num_kv_blocks=64, max_num_batched_tokens=32)
    for out, (_, tokens, _) in zip(outs, reference):
        assert out.outputs[0].token_ids == tokens


def _stdlib_text() -> str:
    return (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()


def test_perplexity_matches_transformers(real, ex32):
    """float32 perplexity of 256 tokens of textwrap.py: ours within 0.5% of transformers'."""
    _, tok, hf = real
    ids = tok(_stdlib_text())["input_ids"][:256]
    req = Request("ppl", ids, SamplingParams(temperature=0))
    (ours,) = Pages(ex32, 32).forward([ScheduledChunk(req, 0, len(ids), True)])
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    target = torch.tensor(ids[1:])

    def ppl(logits: torch.Tensor) -> float:
        return math.exp(torch.nn.functional.cross_entropy(logits[:-1].float(), target).item())

    p_ours, p_ref = ppl(ours), ppl(ref)
    print(f"perplexity ours {p_ours:.4f} transformers {p_ref:.4f}")
    assert abs(p_ours - p_ref) <= 0.005 * p_ref
    assert p_ref < 20   # the model really reads the text (a uniform guess: 49,152)


def test_bf16_default_answers_paris(real):
    """Served as by default (bfloat16, native kernels where the CPU has them)."""
    path, tok, _ = real
    ex = TorchExecutor(path)
    assert ex.dtype == torch.bfloat16
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(prompt)["input_ids"]
    (out,), _ = run_engine(ex, [ids], SamplingParams(temperature=0, max_tokens=10),
                           block_size=BLOCK, num_kv_blocks=16)
    text = tok.decode(out.outputs[0].token_ids)
    assert "Paris" in text, text


# ------------------------------------------------------------------ tiny files
def _fused_source(hf, cfg) -> dict[str, torch.Tensor]:
    """Our parameter name -> the transformers tensors it is made of, concatenated."""
    sd = hf.state_dict()
    return {ours: torch.cat([sd[n] for n in theirs])
            for ours, theirs in checkpoint_names(cfg).items()}


def _assert_params_equal(model, expected: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, ref in expected.items():
        assert torch.equal(params[name].float(), ref.float()), name


@pytest.mark.parametrize("name,arch", [("llama_gqa", "llama"), ("mistral_sw", "mistral"),
                                          ("qwen2_tied", "qwen2"), ("qwen3", "qwen3")])
def test_tiny_gguf_equals_source(name, arch, tmp_path):
    """A checkpoint written as llama.cpp lays it out (q/k rows permuted for llama/mistral) loads
    back to the same weights and config: the q/k row order is undone exactly."""
    hf = build_hf_model(name)
    path = write_gguf(tmp_path / "m.gguf", hf, arch)
    model = load_model(path, dtype="float32")
    cfg, src = model.config, hf.config
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (
        src.num_hidden_layers, src.num_attention_heads, src.num_key_value_heads,
        getattr(src, "head_dim", None) or src.hidden_size // src.num_attention_heads,
        src.vocab_size)
    assert cfg.tie_word_embeddings == bool(src.tie_word_embeddings)
    assert cfg.sliding_window == (8 if arch == "mistral" else None)
    assert cfg.qkv_bias == (arch == "qwen2") and cfg.qk_norm == (arch == "qwen3")
    assert math.isclose(cfg.rms_norm_eps, src.rms_norm_eps, rel_tol=1e-6)
    assert cfg.rope.theta == float(getattr(src, "rope_theta", None)
                                   or src.rope_parameters["rope_theta"])
    _assert_params_equal(model, _fused_source(hf, cfg))


def test_writer_layout_is_what_transformers_reads(tmp_path):
    """The permutation the tiny files use is llama.cpp's as transformers understands it: its
    GGUF loader reads the file back to the original weights (else the test above proves
    nothing about real files)."""
    hf = build_hf_model("llama_gqa")
    path = write_gguf(tmp_path / "m.gguf", hf, "llama")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                             dtype=torch.float32)
    ref = hf.state_dict()
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, ref[name]), name


def _tiny_256():
    """hidden 256: every row is a whole number of K-quant super-blocks."""
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=320, max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("slice_values", [None, 1000])
def test_every_tensor_type_matches_transformers(tmp_path, monkeypatch, slice_values):
    """Each 2-D tensor in a different supported type (all eleven appear); our float32 weights
    equal what transformers' GGUF loader makes of the same file, bf16 is their rounding.
    ``slice_values`` 1000: tensors are dequantized a few rows (q/k: one head) at a time."""
    if slice_values:
        monkeypatch.setattr(gguf_loader, "_SLICE_VALUES", slice_values)
    hf = _tiny_256()
    types = [Q[name] for name in SUPPORTED_TYPES]
    assignment: dict[str, Q] = {}

    def pick(name, shape):
        assignment[name] = types[len(assignment) % len(types)]
        return assignment[name]

    path = write_gguf(tmp_path / "q.gguf", hf, "llama", qtype=pick)
    assert set(assignment.values()) == set(types)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                            dtype=torch.float32)
    model = load_model(path, dtype="float32")
    expected = _fused_source(ref, model.config)
    _assert_params_equal(model, expected)
    bf16 = load_model(path, quantization="none")   # the default serving dtype, dequantized
    assert bf16.embed_tokens.weight.dtype == torch.bfloat16
    _assert_params_equal(bf16, {k: v.to(torch.bfloat16) for k, v in expected.items()})


def test_rope_freqs_tensor_divides_frequencies(tmp_path):
    """Llama 3.1-style files carry per-frequency divisors (rope_freqs.weight)."""
    hf = build_hf_model("llama_gqa")
    plain = load_model(write_gguf(tmp_path / "a.gguf", hf, "llama"), dtype="float32")
    factors = np.linspace(1.0, 8.0, plain.config.head_dim // 2, dtype=np.float32)
    scaled = load_model(write_gguf(tmp_path / "b.gguf", hf, "llama",
                                   extra={"rope_freqs.weight": (factors, None)}), dtype="float32")
    assert torch.allclose(scaled.rotary.inv_freq * torch.from_numpy(factors),
                          plain.rotary.inv_freq)


# ------------------------------------------------------------------ failures
def _one_line_error(path, match: str) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and match in msg, msg
    return msg


def test_missing_file(tmp_path):
    _one_line_error(tmp_path / "nope.gguf", "not found")


@pytest.mark.parametrize("keep", [100_000, 60_000_000])   # in the vocabulary / in tensor data
def test_truncated_file(tmp_path, keep):
    path = tmp_path / "cut.gguf"
    with open(default_model_path(), "rb") as f:
        path.write_bytes(f.read(keep))
    assert is_gguf_file(path)
    _one_line_error(path, "truncated")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.bin"
    path.write_text("hello")
    assert not is_gguf_file(path)
    _one_line_error(path, "not a GGUF file")


def test_unsupported_tensor_type(tmp_path):
    hf = build_hf_model("llama_gqa")
    path = write_gguf(tmp_path / "m.gguf", hf, "llama",
                      qtype=lambda name, shape: Q.IQ4_NL if name == "blk.1.ffn_up.weight" else None)
    msg = _one_line_error(path, "unsupported type IQ4_NL")
    assert "blk.1.ffn_up.weight" in msg


def test_unsupported_architecture(tmp_path):
    hf = build_hf_model("llama_gqa")
    path = write_gguf(tmp_path / "m.gguf", hf, "gpt2")
    _one_line_error(path, "unsupported architecture 'gpt2'")
    with pytest.raises(ModelLoadError, match="unsupported architecture"):
        load_gguf_config(path)


def test_missing_tensor_and_shape_mismatch(tmp_path):
    hf = build_hf_model("llama_gqa")
    path = write_gguf(tmp_path / "a.gguf", hf, "llama", drop={"blk.1.attn_v.weight"})
    _one_line_error(path, "tensor 'blk.1.attn_v.weight' is missing")
    path = write_gguf(tmp_path / "b.gguf", hf, "llama",
                      metadata={"llama.feed_forward_length": 96})
    _one_line_error(path, "has shape")


def test_bad_metadata_value(tmp_path):
    hf = build_hf_model("llama_gqa")
    path = write_gguf(tmp_path / "m.gguf", hf, "llama", metadata={"llama.block_count": "two"})
    _one_line_error(path, "bad metadata value")
