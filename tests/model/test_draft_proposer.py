"""The draft-model proposer on its own: its drafts are the draft model's greedy continuation
(checked against transformers running the same checkpoint), whatever was fed before, through
rollbacks, skipped drafts and evictions; its pages always come back."""
from __future__ import annotations

import random

import pytest
import torch

from tokenfactory.model.proposers import make_proposer
from tokenfactory.model.proposers.draft import DraftAcceptance, DraftModelProposer

K = 4
VOCAB = 512


@pytest.fixture(scope="module")
def model(checkpoint):
    return checkpoint("llama_gqa")        # (directory, transformers model), float32


def make(path, **kw) -> DraftModelProposer:
    """Free drafts (no row or draft cost): every call proposes the full K."""
    args = dict(vocab_size=VOCAB, dtype="float32", block_size=4, draft_cost=0.0, row_cost=0.0)
    args.update(kw)
    return DraftModelProposer(path, **args)


@pytest.fixture(scope="module")
def proposer(model):
    return make(model[0])


def greedy(hf, context: list[int], k: int) -> list[int]:
    """transformers' greedy continuation, recomputed from scratch every token."""
    ids = list(context)
    with torch.no_grad():
        for _ in range(k):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(context):]


def random_context(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def test_incremental_drafts_equal_greedy_through_rollbacks(model, proposer):
    """Each call feeds only the new tokens, yet its draft equals transformers' greedy run over
    the whole context and a from-scratch run of the proposer itself. The target keeps a random
    prefix of each draft (a correction follows); after ``observe`` the cache holds exactly the
    context plus the kept drafts. Every fourth draft never reaches verification (no
    ``observe``) and another token follows instead: the next call must notice."""
    _, hf = model
    rng = random.Random(0)
    context = random_context(rng, 13)
    for step in range(10):
        draft = proposer.propose("a", context, K)
        assert draft == greedy(hf, context, K)
        fresh = proposer.propose(f"fresh{step}", context, K)      # nothing cached: from scratch
        proposer.finished(f"fresh{step}")
        assert fresh == draft
        if step % 4 == 3:      # the step ran without drafts: the target's token differs
            context = context + [(draft[0] + 1) % VOCAB]
            continue
        accepted = rng.randrange(0, K + 1)
        own = (draft[accepted] + 1) % VOCAB if accepted < K else rng.randrange(3, VOCAB)
        proposer.observe("a", accepted, K)
        kept = len(context) + min(accepted, K - 1)   # the K-th draft was never fed
        assert proposer.cached_tokens("a") == (context + draft)[:kept]
        context = context + draft[:accepted] + [own]
    proposer.finished("a")
    assert proposer.num_requests == 0 and proposer.num_free_pages == proposer.num_pages


def test_a_reused_request_id_with_other_text_starts_over(model, proposer):
    _, hf = model
    rng = random.Random(1)
    first, second = random_context(rng, 9), random_context(rng, 9)
    assert proposer.propose("r", first, K) == greedy(hf, first, K)
    assert proposer.propose("r", second, K) == greedy(hf, second, K)   # same id, other text
    assert proposer.propose("r", second[:5], K) == greedy(hf, second[:5], K)   # shorter
    proposer.finished("r")
    assert proposer.num_free_pages == proposer.num_pages


def test_full_pool_evicts_the_least_recently_used_request(model):
    """Six pages of 4 tokens: two 14-token requests (5 pages each with their drafts) cannot
    both stay; the older one is evicted, re-prefills on its next call and drafts the same.
    A request longer than the whole pool gets no drafts, and no error."""
    path, hf = model
    small = make(path, draft_kv_tokens=24)
    rng = random.Random(2)
    a, b = random_context(rng, 14), random_context(rng, 14)
    assert small.propose("a", a, K) == greedy(hf, a, K)
    assert small.propose("b", b, K) == greedy(hf, b, K)
    assert small.num_evictions == 1 and small.cached_tokens("a") == []
    assert small.propose("a", a, K) == greedy(hf, a, K)
    assert small.num_evictions == 2 and small.cached_tokens("b") == []
    assert small.propose("long", random_context(rng, 30), K) == []
    assert small.cached_tokens("long") == []
    assert small.num_free_pages + 5 == small.num_pages      # only "a" holds pages
    for rid in ("a", "b", "long"):
        small.finished(rid)
    assert small.num_requests == 0 and small.num_free_pages == small.num_pages


def test_vocabulary_mismatch_and_bad_specs_are_refused(model):
    path, _ = model
    with pytest.raises(ValueError, match="vocabulary of 512 tokens, but the target's has 1000"):
        make_proposer(f"draft:{path}", vocab_size=1000, dtype="float32")
    with pytest.raises(ValueError, match="vocab_size"):
        make_proposer(f"draft:{path}")
    with pytest.raises(ValueError, match="name the draft model"):
        make_proposer("draft:", vocab_size=VOCAB)
    prop = make_proposer(f"draft:{path}", vocab_size=VOCAB, dtype="float32", block_size=4,
                         draft_kv_tokens=64)
    assert isinstance(prop, DraftModelProposer) and prop.num_pages == 16


def test_the_drafts_own_cost_limits_the_draft_length(model):
    """A drafted token costs its row in the target's step plus the draft's forward: at
    p = 0.95, one draft token pays when the draft is free and not when it costs a whole target
    step. Measured: once the target's step is known to be far cheaper than the draft's
    forward, the proposer stops proposing."""
    free, dear = DraftAcceptance(draft_cost=0.0), DraftAcceptance(draft_cost=1.0)
    for acc in (free, dear):
        acc.hits, acc.misses = 19.0, 1.0
    assert free.best_length(4) > 0 and dear.best_length(4) == 0
    assert dear.row_cost_in(8) > dear.row_cost_in(1)
    # a drafted token dearer than a whole step never pays, even at p = 1: no probes either
    # (the shared model pauses, then probes with one token)
    probe = DraftAcceptance(draft_cost=0.5)
    probe.hits, probe.misses = 1.0, 9.0
    assert sum(probe.limit(4) for _ in range(20)) > 0
    assert sum(dear.limit(4) for _ in range(20)) == 0
    path, _ = model
    prop = make(path, draft_cost=None)            # measured; the prior until then
    rng = random.Random(3)
    context = random_context(rng, 10)
    draft = prop.propose("a", context, K)
    assert draft                                      # the prior lets free rows draft
    prop.observe("a", len(draft), len(draft))
    context = context + draft + [draft[0]]
    draft = prop.propose("a", context, K)             # two new tokens fed: timed
    assert draft
    prop.on_target_step(1e-9, {"a": 1})               # a target step costs (nearly) nothing
    assert prop.draft_cost > 1e3
    prop.observe("a", 0, len(draft))
    assert prop.propose("a", context + [5], K) == []
    prop.finished("a")
    assert prop.num_free_pages == prop.num_pages
