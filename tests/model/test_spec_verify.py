"""Speculative verification: greedy output equals transformers' greedy generation; seeded
sampling gives the plain sampler's tokens; the rejection rule preserves the distribution
(chi-square against the exact distribution, deterministic seed set)."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from tokenfactory.engine.request import Request
from tokenfactory.engine.sampling_params import SamplingParams
from tokenfactory.model.sampler import Sampler
from tokenfactory.model.spec_verify import can_verify, verify, verify_batch


def req(params: SamplingParams, prompt=(1, 2, 3), output=(), eos=frozenset({0})) -> Request:
    r = Request("r", list(prompt), params, eos_token_ids=frozenset(eos))
    r.output_token_ids = list(output)
    return r


def chi_square_p(observed: list[int], expected_probs: list[float]) -> float:
    """Goodness-of-fit p-value (cells with expected count < 5 merged into one)."""
    n = sum(observed)
    cells, small_o, small_e = [], 0, 0.0
    for o, p in zip(observed, expected_probs):
        if n * p < 5:
            small_o, small_e = small_o + o, small_e + n * p
        else:
            cells.append((o, n * p))
    if small_e > 0:
        cells.append((small_o, small_e))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    df = len(cells) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


# ---------------------------------------------------------------------------- greedy, real model

@pytest.fixture(scope="module")
def hf_model(checkpoint):
    return checkpoint("llama_gqa")[1]


def test_greedy_speculation_equals_transformers_generate(hf_model):
    """Drafts that are partly right (the true continuation with random corruptions) verified
    against the model's logits reproduce transformers' greedy output token for token."""
    prompt = [5, 17, 99, 3, 42, 7, 250, 11]
    n_new = 40
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=n_new, min_new_tokens=n_new,
                                do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    rng = random.Random(0)
    request = req(SamplingParams(temperature=0.0), prompt=prompt)
    accepted_counts = []
    while len(request.output_token_ids) < n_new:
        i = len(request.output_token_ids)
        k = rng.randint(0, 5)
        draft = list(ref[i:i + k]) + [rng.randrange(512) for _ in range(k - len(ref[i:i + k]))]
        if draft and rng.random() < 0.5:
            draft[rng.randrange(len(draft))] = rng.randrange(512)
        ctx = prompt + request.output_token_ids + draft
        with torch.no_grad():
            logits = hf_model(torch.tensor([ctx])).logits[0, -(k + 1):].float()   # (k + 1, V)
        v = verify(logits, draft, request)
        assert v.error is None and 1 <= len(v.token_ids) <= k + 1
        assert v.token_ids[:v.num_accepted_drafts] == draft[:v.num_accepted_drafts]
        accepted_counts.append(v.num_accepted_drafts)
        request.output_token_ids += v.token_ids
    assert request.output_token_ids[:n_new] == ref
    assert max(accepted_counts) >= 3 and min(accepted_counts) == 0   # both paths exercised


# ---------------------------------------------------------------------------- a Markov "model"

V = 6


def markov_table(seed: int, spread: float = 1.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, V, generator=g) * spread              # (V, V): logits after a token


def rows_for(table: torch.Tensor, context: list[int], draft: list[int]) -> torch.Tensor:
    """(k + 1, V): the model's logits after context, context + d0, ..."""
    lasts = [context[-1]] + list(draft)
    return table[torch.tensor(lasts)].clone()


@pytest.mark.parametrize("params", [
    dict(temperature=0.8, seed=123),
    dict(temperature=1.3, top_k=4, top_p=0.9, seed=7),
    dict(temperature=1.0, repetition_penalty=1.7, frequency_penalty=0.4, min_tokens=5, seed=99),
    dict(temperature=1.0, logit_bias={3: 2.5, 4: -100}, seed=5),
    # bias before a repetition penalty (the sampler's order): the order changes the numbers
    dict(temperature=1.0, logit_bias={1: 3.0, 2: -1.5}, repetition_penalty=2.0, seed=11),
])
def test_seeded_sampling_matches_plain_sampler(params):
    """With a seed, speculation returns exactly the tokens the plain sampler draws, position by
    position, whatever was proposed (penalties and min_tokens count the drafts as output)."""
    table = markov_table(1)
    sp = SamplingParams(**params)
    plain = req(sp, prompt=[1, 2])
    sampler = Sampler(seed=0)
    for _ in range(30):
        tok = sampler(table[plain.all_token_ids[-1]][None].clone(), [plain]).token_ids[0]
        plain.output_token_ids.append(tok)

    rng = random.Random(5)
    spec = req(sp, prompt=[1, 2])
    while len(spec.output_token_ids) < 30:
        i = len(spec.output_token_ids)
        truth = plain.output_token_ids[i:i + 4]
        draft = [t if rng.random() < 0.7 else rng.randrange(V) for t in truth]
        v = verify(rows_for(table, spec.all_token_ids, draft), draft, spec)
        spec.output_token_ids += v.token_ids
    assert spec.output_token_ids[:30] == plain.output_token_ids


def _sample_paths(table, sp, propose, n_runs: int, length: int, gen_seed: int):
    """Many unseeded speculative runs from the same context; returns the first ``length``
    tokens of each, drawn with one shared generator (the engine's)."""
    gen = torch.Generator().manual_seed(gen_seed)
    rng = random.Random(gen_seed)
    paths = []
    for _ in range(n_runs):
        r = req(sp, prompt=[0])
        while len(r.output_token_ids) < length:
            draft, q = propose(r.all_token_ids, rng)
            v = verify(rows_for(table, r.all_token_ids, draft), draft, r, gen, draft_probs=q)
            r.output_token_ids += v.token_ids
        paths.append(tuple(r.output_token_ids[:length]))
    return paths


def _exact(table, temperature, length):
    probs = (table / temperature).softmax(-1)
    out = {}
    for path in itertools.product(range(V), repeat=length):
        p, last = 1.0, 0
        for t in path:
            p *= float(probs[last, t])
            last = t
        out[path] = p
    return out


def test_rejection_sampling_preserves_distribution():
    """Drafts sampled from a different model q, kept by the rejection rule: the joint
    distribution of the first two tokens equals plain sampling's (chi-square, 36 cells); the
    same drafts simply accepted do not (the test can fail)."""
    table, draft_table = markov_table(2), markov_table(3)
    sp = SamplingParams(temperature=1.0)
    q_probs = draft_table.softmax(-1)

    def propose(ctx, rng):
        draft, q, last = [], [], ctx[-1]
        for _ in range(3):
            t = rng.choices(range(V), weights=q_probs[last].tolist())[0]
            draft.append(t)
            q.append(q_probs[last])
            last = t
        return draft, torch.stack(q)

    exact = _exact(table, 1.0, 2)
    cells = list(exact)
    paths = _sample_paths(table, sp, propose, 3000, 2, gen_seed=11)
    observed = [paths.count(c) for c in cells]
    assert chi_square_p(observed, [exact[c] for c in cells]) > 1e-3

    rng = random.Random(1)
    naive = [tuple(propose([0], rng)[0][:2]) for _ in range(3000)]      # drafts kept blindly
    assert chi_square_p([naive.count(c) for c in cells], [exact[c] for c in cells]) < 1e-6


def test_point_mass_drafts_preserve_distribution():
    """n-gram-style drafts (a fixed guess, no distribution), unseeded: the first three tokens
    follow the plain sampling distribution (216 cells, small ones merged)."""
    table = markov_table(4, spread=2.0)
    sp = SamplingParams(temperature=0.7)

    def propose(ctx, rng):
        return [(ctx[-1] + 1) % V, (ctx[-1] + 2) % V], None

    exact = _exact(table, 0.7, 3)
    cells = list(exact)
    paths = _sample_paths(table, sp, propose, 3000, 3, gen_seed=12)
    assert chi_square_p([paths.count(c) for c in cells], [exact[c] for c in cells]) > 1e-3


# ---------------------------------------------------------------------------- edges

def test_bad_rows_and_shapes():
    sp = SamplingParams(temperature=0.0)
    logits = torch.zeros(4, V)
    logits[torch.arange(4), torch.tensor([2, 3, 4, 5])] = 5.0
    v = verify(logits, [2, 3, 4], req(sp))
    assert (v.token_ids, v.num_accepted_drafts, v.error) == ([2, 3, 4, 5], 3, None)

    broken = logits.clone()
    broken[2, 1] = float("nan")
    v = verify(broken, [2, 3, 4], req(sp))           # rows 0-1 fine: their drafts stand
    assert (v.token_ids, v.num_accepted_drafts, v.error) == ([2, 3], 2, None)
    broken[0, 0] = float("inf")
    v = verify(broken, [2, 3, 4], req(SamplingParams(temperature=1.0, seed=1)))
    assert v.token_ids == [] and "non-finite" in v.error

    with pytest.raises(ValueError, match="need 4 rows"):
        verify(torch.zeros(3, V), [1, 2, 3], req(sp))
    with pytest.raises(ValueError, match="need 5 rows of logits for 2 requests"):
        verify_batch(torch.zeros(4, V), [[1], [2, 3]], [req(sp), req(sp)])


def test_min_tokens_counts_drafts_and_batch_splits_rows():
    """EOS (id 0) is the argmax everywhere; min_tokens=3 with one output so far bans it in the
    first two rows only, so a draft of EOS is rejected at row 0 and accepted at row 2."""
    sp = SamplingParams(temperature=0.0, min_tokens=3)
    logits = torch.zeros(4, V)
    logits[:, 0] = 9.0
    logits[:, 4] = 5.0
    v = verify(logits, [4, 4, 0], req(sp, output=[4]))
    assert v.token_ids == [4, 4, 0, 0] and v.num_accepted_drafts == 3
    v = verify(logits[:2], [0], req(sp, output=[4]))
    assert v.token_ids == [4] and v.num_accepted_drafts == 0

    both = verify_batch(torch.cat([logits, logits[:1]]), [[4, 4, 0], []],
                        [req(sp, output=[4]), req(SamplingParams(temperature=0.0))])
    assert [b.token_ids for b in both] == [[4, 4, 0, 0], [0]]
    assert can_verify(req(sp))


def test_batch_equals_one_by_one():
    """The batched greedy shortcut decides exactly as ``verify`` does, mixed with requests that
    take the full path (min_tokens pending, seeded sampling)."""
    g = torch.Generator().manual_seed(8)
    rng = random.Random(8)
    kinds = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, min_tokens=4),
             SamplingParams(temperature=0.9, seed=3)]
    for _ in range(12):
        requests = [req(rng.choice(kinds), output=[1] * rng.randint(0, 5)) for _ in range(4)]
        drafts = [[rng.randrange(V) for _ in range(rng.randint(0, 4))] for _ in requests]
        logits = torch.randn(sum(len(d) + 1 for d in drafts), V, generator=g) * 3
        for j, d in enumerate(drafts):                # make some drafts the argmax
            start = sum(len(x) + 1 for x in drafts[:j])
            for i, t in enumerate(d):
                if rng.random() < 0.6:
                    logits[start + i, t] = 20.0
        batch = verify_batch(logits, drafts, requests)
        start = 0
        for d, r, b in zip(drafts, requests, batch):
            one = verify(logits[start:start + len(d) + 1], d, r)
            assert (b.token_ids, b.num_accepted_drafts) == (one.token_ids, one.num_accepted_drafts)
            start += len(d) + 1
