"""Sampler: filters never leak excluded tokens, seeds are reproducible and batch-independent,
penalties and logprobs match straightforward references."""
from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenfactory.engine.request import Request
from tokenfactory.engine.sampling_params import SamplingParams
from tokenfactory.model.sampler import Sampler, filter_logits

V = 64


def req(params: SamplingParams, prompt=(1, 2, 3), output=(), eos=frozenset({0}), rid="r"):
    r = Request(rid, list(prompt), params, eos_token_ids=frozenset(eos))
    r.output_token_ids = list(output)
    return r


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), top_k=st.integers(0, V + 5),
       top_p=st.floats(0.01, 1.0), min_p=st.floats(0.0, 1.0),
       temperature=st.floats(0.05, 3.0), spread=st.floats(0.1, 20.0))
def test_filters_never_emit_excluded_tokens(seed, top_k, top_p, min_p, temperature, spread):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, V, generator=gen) * spread
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            seed=seed)
    requests = [req(params, rid=str(i)) for i in range(3)]
    tokens = Sampler(seed=seed)(logits.clone(), requests).token_ids
    for row, tok in zip(logits, tokens):
        scaled = row / temperature
        probs = scaled.softmax(-1)
        order = probs.argsort(descending=True).tolist()
        rank = order.index(tok)
        if top_k > 0:
            assert rank < top_k
        # top-p: the tokens ranked before it must not already cover top_p (after top-k)
        kept = order[:top_k] if top_k > 0 else order
        renorm = probs[kept] / probs[kept].sum()
        assert renorm[:rank].sum().item() < top_p + 1e-5
        # min-p: probability at least min_p times the top token's
        assert probs[tok] >= min_p * probs.max() * (1 - 1e-5)


def test_filter_logits_exact():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).log_softmax(-1)  # probs descending
    keep = lambda **kw: (filter_logits(logits.clone(),
                                       torch.tensor([kw.get("k", 0)]),
                                       torch.tensor([kw.get("p", 1.0)]),
                                       torch.tensor([kw.get("m", 0.0)]))[0] > -math.inf).tolist()
    assert keep(k=2) == [True, True, False, False, False]
    probs = logits.exp()[0]
    assert keep(p=probs[0].item() - 1e-4) == [True, False, False, False, False]
    assert keep(p=probs[0].item() + 1e-4) == [True, True, False, False, False]
    assert keep(m=float(probs[2] / probs[0]) - 1e-4) == [True, True, True, False, False]
    assert keep() == [True] * 5


def test_greedy_is_argmax():
    logits = torch.randn(4, V)
    out = Sampler()(logits.clone(), [req(SamplingParams(temperature=0)) for _ in range(4)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_seeded_sampling_reproducible_and_batch_independent():
    torch.manual_seed(0)
    target = torch.randn(V)
    params = SamplingParams(temperature=1.0, seed=1234)
    alone = [Sampler(seed=s)(target[None].clone(), [req(params, output=[5] * i)]).token_ids[0]
             for s, i in ((1, 0), (2, 1), (3, 2))]
    # same positions, inside a batch with other (seeded and unseeded) requests
    for i in range(3):
        others = torch.randn(3, V)
        logits = torch.cat([others[:2], target[None], others[2:]])
        requests = [req(SamplingParams(temperature=1.0)), req(SamplingParams(seed=9)),
                    req(params, output=[5] * i), req(SamplingParams(temperature=0.5))]
        assert Sampler(seed=100 + i)(logits, requests).token_ids[2] == alone[i]
    # different positions draw differently (with overwhelming probability over 40 draws)
    draws = {Sampler()(target[None].clone(), [req(params, output=[5] * i)]).token_ids[0]
             for i in range(40)}
    assert len(draws) > 1


def test_seeded_distribution_follows_probs():
    probs = torch.tensor([0.7, 0.2, 0.1] + [0.0] * (V - 3))
    logits = probs.log()
    counts = [0] * 3
    for i in range(600):
        tok = Sampler()(logits[None].clone(), [req(SamplingParams(seed=5), output=[1] * i)]).token_ids[0]
        counts[tok] += 1
    assert counts[0] > counts[1] > counts[2] > 0


def _reference_penalties(logits, prompt, output, rep, pres, freq):
    out = logits.clone()
    for t in set(prompt) | set(output):
        out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
    for t in set(output):
        out[t] -= freq * output.count(t) + pres
    return out


def test_penalties_match_reference():
    from tokenfactory.model.sampler import apply_penalties
    gen = random.Random(0)
    rows, requests, refs = [], [], []
    for i in range(4):
        logits = torch.randn(V) * 3
        prompt = [gen.randrange(V) for _ in range(10)]
        output = [gen.randrange(V) for _ in range(15)]
        rep, pres, freq = [(1.3, 0.5, 0.2), (1.0, 0.0, 0.0), (0.8, -0.5, 1.0), (1.0, 1.5, 0.0)][i]
        requests.append(req(SamplingParams(repetition_penalty=rep, presence_penalty=pres,
                                           frequency_penalty=freq), prompt, output))
        rows.append(logits)
        refs.append(_reference_penalties(logits, prompt, output, rep, pres, freq))
    got = apply_penalties(torch.stack(rows), requests)
    torch.testing.assert_close(got, torch.stack(refs))


def test_penalties_steer_greedy():
    logits = torch.zeros(1, V)
    logits[0, 7], logits[0, 8] = 2.0, 1.9
    r = req(SamplingParams(temperature=0, presence_penalty=0.5), output=[7])
    assert Sampler()(logits.clone(), [r]).token_ids == [8]


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.zeros(2, V)
    logits[:, 0] = 10.0   # eos
    logits[:, 3] = 9.0    # stop token id
    logits[:, 11] = 1.0   # best allowed token
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3])
    below = req(params, output=[5], eos={0})
    reached = req(params, output=[5, 6], eos={0})
    assert Sampler()(logits.clone(), [below, reached]).token_ids == [11, 0]
    ignoring = req(SamplingParams(temperature=0, min_tokens=2, ignore_eos=True), output=[], eos={0})
    assert Sampler()(logits.clone(), [ignoring]).token_ids[0] != 0


@pytest.mark.parametrize("num", [0, 1, 5])
def test_logprobs_are_raw_log_softmax(num):
    torch.manual_seed(3)
    logits = torch.randn(2, V) * 4
    params = SamplingParams(temperature=0.7, logprobs=num, seed=1, repetition_penalty=1.5)
    out = Sampler()(logits.clone(), [req(params), req(SamplingParams(temperature=0))])
    assert out.logprobs[1] is None
    ref = logits[0].log_softmax(-1)
    entry = out.logprobs[0]
    tok = out.token_ids[0]
    assert tok in entry
    top = ref.argsort(descending=True).tolist()
    for rank, t in enumerate(top[:num], 1):
        assert entry[t].rank == rank
        assert entry[t].logprob == pytest.approx(ref[t].item(), abs=1e-5)
    assert entry[tok].rank == top.index(tok) + 1
    assert entry[tok].logprob == pytest.approx(ref[tok].item(), abs=1e-5)
    assert len(entry) in (num, num + 1)


# ------------------------------------------------------------- a row is judged alone (issue 13)
def test_unsampleable_row_fails_alone_and_others_are_unchanged():
    torch.manual_seed(1)
    logits = torch.randn(4, V) * 3
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, seed=11),
              SamplingParams(temperature=0.8, seed=12, logprobs=2), SamplingParams(temperature=0)]
    alone = [Sampler(seed=0)(logits[i:i + 1].clone(), [req(p)]) for i, p in enumerate(params)]
    for bad_row, fault in ((1, math.nan), (2, math.inf), (0, -math.inf)):
        broken = logits.clone()
        if fault == -math.inf:
            broken[bad_row] = fault            # nothing left to sample
        else:
            broken[bad_row, 5] = fault
        requests = [req(p, rid=str(i)) for i, p in enumerate(params)]
        out = Sampler(seed=0)(broken, requests)
        for i in range(4):
            if i == bad_row:
                assert out.token_ids[i] is None and out.logprobs[i] is None
                assert requests[i].sampling_error
            else:
                assert requests[i].sampling_error is None
                assert out.token_ids[i] == alone[i].token_ids[0]
                assert out.logprobs[i] == alone[i].logprobs[0]


def test_tiny_repetition_penalty_stays_finite():
    from tokenfactory.model.sampler import apply_penalties
    logits = torch.randn(1, V) * 5
    logits[0, 1] = 3.0
    r = req(SamplingParams(repetition_penalty=1e-300), prompt=[1, 2, 3])
    got = apply_penalties(logits.clone(), [r])
    assert torch.isfinite(got).all()
    # seen positive logits are pushed to the top, seen negative ones to ~0
    assert got[0].argmax().item() in (1, 2, 3) and got[0, 1] == torch.finfo(torch.float32).max
    out = Sampler(seed=0)(logits.clone(), [req(SamplingParams(repetition_penalty=1e-300,
                                                               temperature=0.5, seed=1))])
    assert out.token_ids[0] is not None


def test_scaled_logits_overflow_samples_the_same_distribution():
    """logits / T overflowing float32 is recomputed from the row maximum: the draw is the one
    the mathematically identical, shifted row gives, and other rows are unaffected."""
    torch.manual_seed(2)
    base = torch.randn(V)
    huge = base * 1e34                       # / 1e-5 overflows float32 (max ~3.4e38)
    p = SamplingParams(temperature=1e-5, seed=4)
    got = Sampler()(torch.stack([huge, base]), [req(p, rid="a"), req(p, rid="b")]).token_ids
    assert got[0] == huge.argmax().item()    # so peaked that only the top token survives
    # the same distribution written without overflow (every value <= 0) draws the same
    assert got[0] == Sampler()((huge - huge.max())[None], [req(p)]).token_ids[0]
    assert got[1] == Sampler()(base[None].clone(), [req(p)]).token_ids[0]


def test_stop_ids_for_min_tokens_are_built_once_per_request():
    logits = torch.zeros(1, V)
    logits[0, 3], logits[0, 0], logits[0, 9] = 9.0, 8.0, 1.0   # stop id, eos, best allowed
    r = req(SamplingParams(temperature=0, min_tokens=5, stop_token_ids=[3, 4, 10**6]), eos={0})
    for n in range(3):
        r.output_token_ids = [7] * n
        assert Sampler()(logits.clone(), [r]).token_ids == [9]
    vocab, ban = r.sampler_cache["min_tokens_ban"]
    assert vocab == V and ban.tolist() == [0, 3, 4]


def test_penalty_state_follows_growing_outputs():
    """The per-request seen/counts state is updated step by step, not rebuilt: after every new
    output it matches the reference computed from scratch."""
    from tokenfactory.model.sampler import apply_penalties
    gen = random.Random(5)
    prompt = [gen.randrange(V) for _ in range(30)] + [V + 3, -1]   # out-of-vocab ids ignored
    r = req(SamplingParams(repetition_penalty=1.4, presence_penalty=0.3, frequency_penalty=0.7),
            prompt)
    for step in range(12):
        logits = torch.randn(1, V) * 3
        ref = _reference_penalties(logits[0], prompt[:30], r.output_token_ids, 1.4, 0.3, 0.7)
        torch.testing.assert_close(apply_penalties(logits.clone(), [r])[0], ref)
        r.output_token_ids.append(gen.randrange(V))
    assert r.sampler_cache["penalties"][3] == 11
