"""The native bfloat16 attention kernels (model/kernels/attention.c): prefill and decode.

Checked against float32 attention computed by torch from the same bf16 inputs, on shapes that
hit every edge: GQA/MHA/MQA, head sizes 64 and 128, chunks after a cached prefix, sliding
windows shorter than the chunk, chunk and context lengths that are not multiples of the
kernel's 4-row / 32-row / 64-key tiles, pages in random order. Then end to end: a bfloat16
model whose prefills run through the kernel agrees with the same model on torch's SDPA.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
import transformers

from tokenfactory.engine.sampling_params import SamplingParams
from tokenfactory.model import kernels, layers
from tokenfactory.model.runner import TorchExecutor

from .conftest import run_engine

pytestmark = pytest.mark.skipif(kernels.library() is None,
                                reason=f"native kernel unavailable: {kernels.unavailable_reason}")


def reference(q, k_cache, v_cache, table, start, window, scale):
    n, num_heads, d = q.shape
    num_kv, _, bs, _ = k_cache.shape
    group, end = num_heads // num_kv, start + q.shape[0]
    k = k_cache[:, table].reshape(num_kv, -1, d)[:, :end].float().repeat_interleave(group, 0)
    v = v_cache[:, table].reshape(num_kv, -1, d)[:, :end].float().repeat_interleave(group, 0)
    qpos, kpos = torch.arange(start, end)[:, None], torch.arange(end)[None]
    mask = kpos <= qpos
    if window:
        mask &= kpos > qpos - window
    out = F.scaled_dot_product_attention(q.float().transpose(0, 1)[None], k[None], v[None],
                                         attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)


CASES = [  # n, start, H, Hkv, D, window, block_size
    (37, 0, 12, 4, 64, None, 16),       # fresh prompt, GQA, n not a multiple of the tiles
    (100, 50, 8, 8, 64, None, 16),      # after a cached prefix, MHA
    (300, 700, 12, 4, 64, 128, 16),     # sliding window shorter than the chunk
    (65, 130, 4, 1, 128, None, 16),     # MQA, head_dim 128
    (1, 200, 12, 4, 64, None, 16),      # a single token
    (64, 0, 6, 2, 128, 17, 4),          # window not aligned to anything, small pages
    (129, 1000, 2, 2, 256, None, 32),   # head_dim 256, large pages
]


@pytest.mark.parametrize("n,start,heads,kv_heads,head_dim,window,bs", CASES)
def test_kernel_matches_float32_attention(n, start, heads, kv_heads, head_dim, window, bs):
    torch.manual_seed(n + start)
    end = start + n
    pages = (end + bs - 1) // bs
    num_blocks = 2 * pages + 3
    k_cache = torch.randn(kv_heads, num_blocks, bs, head_dim).to(torch.bfloat16)
    v_cache = torch.randn(kv_heads, num_blocks, bs, head_dim).to(torch.bfloat16)
    table = torch.randperm(num_blocks)[:pages]
    # q as the model has it: a (n, H, D) view into a wider (n, H + Hkv, D) tensor
    qk = (2 * torch.randn(n, heads + kv_heads, head_dim)).to(torch.bfloat16)
    q = qk[:, :heads]
    out = torch.full((n, heads, head_dim), float("nan"), dtype=torch.bfloat16)
    scale = head_dim ** -0.5
    kernels.prefill_attention(q, k_cache, v_cache, table, start, window, scale, out)
    ref = reference(q, k_cache, v_cache, table, start, window, scale)
    err = (out.float() - ref).abs().max().item()
    # the same inputs through torch in bfloat16: our error must be of the same order
    torch_bf16 = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k_cache[:, table].reshape(kv_heads, -1, head_dim)[:, :end].repeat_interleave(heads // kv_heads, 0)[None],
        v_cache[:, table].reshape(kv_heads, -1, head_dim)[:, :end].repeat_interleave(heads // kv_heads, 0)[None],
        attn_mask=(torch.arange(end)[None] <= torch.arange(start, end)[:, None]) & (
            torch.arange(end)[None] > torch.arange(start, end)[:, None] - (window or end + 1)),
        scale=scale)[0].transpose(0, 1)
    torch_err = (torch_bf16.float() - ref).abs().max().item()
    assert not torch.isnan(out).any()
    assert err <= max(2 * torch_err, 1e-2), (err, torch_err)


DECODE_CASES = [  # b, H, Hkv, D, window, block_size, max_len
    (1, 12, 4, 64, None, 16, 300),
    (5, 8, 8, 64, None, 16, 1000),     # MHA, several sequences of different lengths
    (3, 12, 4, 64, 50, 4, 400),        # sliding window
    (4, 4, 1, 128, None, 16, 77),      # MQA, head_dim 128
    (2, 16, 2, 64, 7, 16, 100),        # G = 8: two passes over V
    (2, 2, 2, 256, None, 32, 90),
]


@pytest.mark.parametrize("b,heads,kv_heads,head_dim,window,bs,max_len", DECODE_CASES)
def test_decode_kernel_matches_float32_attention(b, heads, kv_heads, head_dim, window, bs, max_len):
    torch.manual_seed(b * max_len)
    positions = torch.randint(0, max_len, (b,))
    positions[0] = 0                                   # a sequence whose only key is itself
    pages = (max_len + bs - 1) // bs
    num_blocks = b * pages + 5
    k_cache = torch.randn(kv_heads, num_blocks, bs, head_dim).to(torch.bfloat16)
    v_cache = torch.randn(kv_heads, num_blocks, bs, head_dim).to(torch.bfloat16)
    tables = torch.randperm(num_blocks)[:b * pages].view(b, pages)
    q = (2 * torch.randn(b, heads + kv_heads, head_dim)).to(torch.bfloat16)[:, :heads]
    out = torch.full((b, heads, head_dim), float("nan"), dtype=torch.bfloat16)
    scale = head_dim ** -0.5
    kernels.decode_attention(q, k_cache, v_cache, tables, positions, window, scale, out)
    for i in range(b):
        pos = int(positions[i])
        ref = reference(q[i:i + 1], k_cache, v_cache, tables[i], pos, window, scale)
        # float32 accumulation and probabilities: only the output's bf16 rounding remains
        torch.testing.assert_close(out[i:i + 1].float(), ref, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("heads,kv_heads,head_dim,window,bs", [
    (9, 3, 64, None, 16),      # SmolLM2's heads
    (8, 2, 128, 21, 4),        # head_dim 128, a window, drafts across several small pages
    (2, 2, 192, None, 8),
    (16, 1, 64, None, 16),     # G = 16: pass 3 in several passes per row
])
def test_rows_of_one_sequence_equal_each_row_alone(heads, kv_heads, head_dim, window, bs):
    """A token and its drafts (consecutive positions, one block table) attend together, one
    pass over the K/V pages for all of them; each row must still be bit for bit what it is
    alone, which greedy speculation relies on. Groups of 1-8 rows starting anywhere in a page
    (so drafts cross page boundaries), beside a sequence of other pages in the same call."""
    torch.manual_seed(heads * head_dim)
    pages = 12
    k_cache = torch.randn(kv_heads, 40, bs, head_dim).to(torch.bfloat16)
    v_cache = torch.randn(kv_heads, 40, bs, head_dim).to(torch.bfloat16)
    table = torch.randperm(40)[:pages]
    other = torch.randperm(40)[:pages]
    scale = head_dim ** -0.5

    def attend(tables, positions):
        q = (2 * torch.randn(len(positions), heads, head_dim, generator=torch.Generator()
                             .manual_seed(7))).to(torch.bfloat16)
        out = torch.empty(len(positions), heads, head_dim, dtype=torch.bfloat16)
        kernels.decode_attention(q, k_cache, v_cache, torch.stack(tables),
                                 torch.tensor(positions), window, scale, out)
        return q, out

    for rows in range(1, 9):
        start = (rows * 13) % (pages * bs - 8 - bs) + (bs - 2 if rows % 2 else 0)
        positions = [start + i for i in range(rows)] + [5 * bs + 3]
        q, together = attend([table] * rows + [other], positions)
        for i, pos in enumerate(positions):
            alone = torch.empty(1, heads, head_dim, dtype=torch.bfloat16)
            kernels.decode_attention(q[i:i + 1], k_cache, v_cache,
                                     (table if i < rows else other)[None],
                                     torch.tensor([pos]), window, scale, alone)
            assert torch.equal(together[i:i + 1], alone), (rows, i)


def test_kernel_rejects_unsupported_shapes():
    q = torch.zeros(4, 4, 32, dtype=torch.bfloat16)
    cache = torch.zeros(2, 4, 16, 32, dtype=torch.bfloat16)
    assert not kernels.supports(torch.bfloat16, 32) and not kernels.supports(torch.float32, 64)
    with pytest.raises(ValueError, match="rejected"):
        kernels.prefill_attention(q, cache, cache, torch.arange(1), 0, None, 1.0, q.clone())
    q64, cache64 = torch.zeros(4, 4, 64, dtype=torch.bfloat16), torch.zeros(2, 4, 16, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="cannot hold"):
        kernels.prefill_attention(q64, cache64, cache64, torch.arange(1), 14, None, 1.0, q64.clone())
    q64, cache64 = torch.zeros(1, 4, 64, dtype=torch.bfloat16), torch.zeros(2, 4, 16, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="past its block table"):   # never reads out of bounds
        kernels.decode_attention(q64, cache64, cache64, torch.zeros(1, 2, dtype=torch.int64),
                                 torch.tensor([32]), None, 1.0, q64.clone())
    with pytest.raises(ValueError, match="unsupported"):
        kernels.decode_attention(q, cache, cache, torch.zeros(4, 1, dtype=torch.int64),
                                 torch.zeros(4, dtype=torch.int64), None, 1.0, q.clone())


def assert_greedy_agree(x, y, tol: float = 0.3, tie: float = 0.15) -> None:
    """Two bfloat16 greedy runs (logprobs=2) agree: same tokens with logprobs within ``tol``
    (this random model amplifies bfloat16 rounding: float32 vs bfloat16 differ by as much),
    except that they may fork where they saw a near-tie (top two within ``tie``), after which
    the contexts differ and nothing more is compared."""
    for i, (tx, ty, lx, ly) in enumerate(zip(x.token_ids, y.token_ids, x.logprobs, y.logprobs)):
        if tx != ty:
            gaps = [abs(lx[tx].logprob - lx[ty].logprob) if ty in lx else 0.0,
                    abs(ly[ty].logprob - ly[tx].logprob) if tx in ly else 0.0]
            assert i > 0 and max(gaps) < tie, f"fork at token {i} without a near-tie: {lx} vs {ly}"
            return
        assert lx[tx].logprob == pytest.approx(ly[ty].logprob, abs=tol)


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    """A 2-layer Llama with head_dim 64 (GQA 4:2), saved as a checkpoint."""
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                      max_position_embeddings=512, initializer_range=0.3)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    path = tmp_path_factory.mktemp("llama_d64")
    model.save_pretrained(path)
    return path


def test_engine_prefill_through_kernel_matches_sdpa(bf16_model, monkeypatch):
    """Greedy tokens agree with the SDPA path's, and prompt logprobs are as close to the
    float32 model's as the SDPA path's are (bfloat16 noise, not a kernel error)."""
    gen = random.Random(1)
    shared = [gen.randrange(512) for _ in range(70)]
    prompts = [shared + [gen.randrange(512) for _ in range(gen.randrange(5, 60))] for _ in range(4)]
    params = SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=1, logprobs=2)
    calls = []
    real = kernels.prefill_attention
    monkeypatch.setattr(kernels, "prefill_attention", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(ex):
        # 32-token chunks over 16-token pages: fresh chunks, chunks after cached pages, and
        # prefix-cache hits for the later prompts (run one by one so that they hit)
        outs = []
        for p in prompts:
            (o,), _ = run_engine(ex, [p], params, block_size=16, max_num_batched_tokens=32)
            outs.append(o)
        return outs

    def logprob_error(outs, ref):
        return [abs(x[t].logprob - y[t].logprob) for a, b in zip(outs, ref) for x, y, t in
                zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], a.prompt_token_ids[1:])]

    fp32 = run(TorchExecutor(bf16_model, dtype="float32"))
    assert not calls   # float32 never uses the kernel
    bf16 = TorchExecutor(bf16_model, dtype="bfloat16")
    native = run(bf16)
    assert calls, "the kernel was not used"
    monkeypatch.setitem(layers._native_ok, (torch.bfloat16, 64), False)
    calls.clear()
    sdpa = run(bf16)
    assert not calls
    for a, b in zip(native, sdpa):
        assert_greedy_agree(a.outputs[0], b.outputs[0])
    err_native, err_sdpa = logprob_error(native, fp32), logprob_error(sdpa, fp32)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(err_native) <= 1.5 * mean(err_sdpa) + 1e-3, (mean(err_native), mean(err_sdpa))
    assert max(err_native) <= 2 * max(err_sdpa) + 1e-2, (max(err_native), max(err_sdpa))
