"""Draft-model speculation through the engine: greedy output identical token for token with and
without it, on the random test checkpoints, alone and batched with a request that does not
speculate, with chunked prefill and forced preemption; no page leaks in either cache.

Three drafts: the target itself (every draft must be accepted), the target with noise in its
weights (drafts partly accepted, so rejected drafts are rolled back on every path), and an
unrelated smaller random model with the same vocabulary (almost every draft rejected)."""
from __future__ import annotations

import pytest
import torch

from tokenfactory.engine.sampling_params import SamplingParams
from tokenfactory.model.proposers.draft import DraftModelProposer
from tests.engine.test_speculative import TIGHT, repetitive_prompts, run_model


@pytest.fixture(scope="module")
def torch_executor(tiny_llama_dir):
    from tokenfactory.model.runner import TorchExecutor
    return TorchExecutor(tiny_llama_dir, dtype="float32", seed=0)


@pytest.fixture(scope="module")
def draft_dirs(tiny_llama_dir, tmp_path_factory):
    """{"self": the target, "noisy": its weights plus noise, "other": a smaller random model}."""
    import transformers
    target = transformers.LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(torch.randn_like(p) * 0.15 * p.std())
    noisy = tmp_path_factory.mktemp("draft-noisy")
    target.save_pretrained(noisy)
    cfg = transformers.LlamaConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
        initializer_range=0.5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(2)
    other = tmp_path_factory.mktemp("draft-other")
    transformers.LlamaForCausalLM(cfg).save_pretrained(other)
    return {"self": tiny_llama_dir, "noisy": noisy, "other": other}


_drafts: dict[tuple, DraftModelProposer] = {}


def draft(dirs, kind: str, kv_tokens: int) -> DraftModelProposer:
    """One proposer per (draft, pool size) for the module (requests leave nothing behind)."""
    key = (kind, kv_tokens)
    if key not in _drafts:
        # draft_cost 0: the drafts' own cost is not what these tests are about; the row cost
        # still shortens drafts of a request whose drafts keep failing
        _drafts[key] = DraftModelProposer(dirs[kind], vocab_size=512, dtype="float32",
                                          block_size=4, draft_kv_tokens=kv_tokens,
                                          draft_cost=0.0)
    return _drafts[key]


GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
# logprobs asked: this request never speculates (verification returns no per-token logprobs)
WITH_LOGPROBS = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=1)
_plain: list = []     # the run without speculation, once for the module


@pytest.mark.parametrize("kind, kv_tokens", [("self", 64), ("noisy", 4096), ("other", 4096)])
def test_greedy_identical_with_a_draft_model(torch_executor, draft_dirs, kind, kv_tokens):
    """Chunked prefill (16-token budget) and a target pool small enough to preempt. 64
    draft-cache tokens (16 pages) hold one or two requests: that batched run evicts too."""
    prompts = repetitive_prompts(5, seed=3)
    params = [GREEDY] * 4 + [WITH_LOGPROBS]
    if not _plain:
        _plain.append(run_model(torch_executor, prompts, params, **TIGHT)[0])
    plain = _plain[0]
    proposer = draft(draft_dirs, kind, kv_tokens)
    spec, core = run_model(torch_executor, prompts, params, proposer=proposer, **TIGHT)
    assert spec == plain
    stats = core.spec_stats["draft"]
    assert stats.num_drafts > 0
    if kind == "self":     # the draft is the target: it is never wrong
        assert stats.num_accepted_tokens == stats.num_draft_tokens
    elif kind == "noisy":
        assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    else:
        assert stats.num_accepted_tokens < stats.num_draft_tokens / 2
    assert core.preemptions > 0
    if kv_tokens < 1000:
        assert proposer.num_evictions > 0
    assert proposer.num_requests == 0 and proposer.num_free_pages == proposer.num_pages
    alone, core = run_model(torch_executor, prompts[:1], params[:1], proposer=proposer, **TIGHT)
    assert alone[0] == plain[0] and core.spec_stats["draft"].num_drafts > 0
    if kind == "self":     # 20 tokens in fewer steps than one per token (prefill included)
        assert core.num_steps < GREEDY.max_tokens
    assert proposer.num_requests == 0 and proposer.num_free_pages == proposer.num_pages
