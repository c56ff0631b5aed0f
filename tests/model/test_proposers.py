"""Proposers: n-gram lookup equals a brute-force reference and reads O(1) tokens per step;
suffix decoding finds repeats in its context and in other requests' outputs within bounded
memory; adaptivity stops proposing on text that never repeats and keeps going on text that does."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenfactory.model.proposers import (Acceptance, NgramProposer, Proposer, SuffixProposer, TokenView,
                                          make_proposer)


def brute_ngram(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """The longest n whose last-n tokens occurred earlier with a continuation; the latest one."""
    L = len(tokens)
    for n in range(min(max_n, L), min_n - 1, -1):
        pattern = tokens[L - n:]
        for start in range(L - n - 1, -1, -1):
            if tokens[start:start + n] == pattern:
                return tokens[start + n:start + n + k]
    return []


@settings(max_examples=60, deadline=None)
@given(tokens=st.lists(st.integers(0, 4), min_size=1, max_size=60), k=st.integers(1, 6),
       min_n=st.integers(1, 3), extra=st.integers(0, 3))
def test_ngram_equals_brute_force(tokens, k, min_n, extra):
    p = NgramProposer(min_n=min_n, max_n=min_n + extra, row_cost=0.0)   # free rows: all k
    for L in range(1, len(tokens) + 1):          # the context grows one token per step
        assert p.propose("r", tokens[:L], k) == brute_ngram(tokens[:L], k, min_n, min_n + extra)


class CountingList(list):
    """A list that counts how many elements callers read."""
    reads = 0

    def __getitem__(self, i):
        item = super().__getitem__(i)
        CountingList.reads += len(item) if isinstance(i, slice) else 1
        return item


@pytest.mark.parametrize("name", ["ngram", "suffix"])
def test_reads_per_step_do_not_grow_with_context(name):
    """Each step reads the new token and a bounded window, never the whole context again."""
    rng = random.Random(0)
    p = make_proposer(name)
    ctx = CountingList(rng.randrange(50) for _ in range(3000))
    p.propose("r", ctx, 8)
    per_step = []
    for _ in range(200):
        ctx.append(rng.randrange(50))
        before = CountingList.reads
        p.propose("r", ctx, 8)
        per_step.append(CountingList.reads - before)
    assert max(per_step) <= 64, max(per_step)


@pytest.mark.parametrize("name", ["ngram", "suffix"])
def test_finds_repeated_span(name):
    rng = random.Random(1)
    span = [rng.randrange(1000) for _ in range(40)]
    noise = [rng.randrange(1000, 2000) for _ in range(30)]
    ctx = noise + span + noise[:5] + span[:6]      # re-emitting the span: expect its next tokens
    p = make_proposer(name, row_cost=0.0)          # free rows: the lookup alone sets the length
    assert isinstance(p, Proposer)
    draft = p.propose("r", ctx, 5)
    assert draft and draft == span[6:6 + len(draft)]
    assert len(draft) == 5 if name == "ngram" else len(draft) >= 3
    p.finished("r")
    assert p.num_requests == 0


def test_ngram_prefers_longer_match_and_rebuilds_on_new_context():
    p = NgramProposer(min_n=1, max_n=3, row_cost=0.0)   # free rows: the lookup alone
    ctx = [7, 1, 2, 3, 9, 2, 3, 8, 1, 2, 3]           # "1 2 3" -> 9 beats the later "2 3" -> 8
    assert p.propose("r", ctx, 2) == [9, 2]
    assert p.propose("r", [5, 6, 5], 2) == [6, 5]      # same id, unrelated text: no stale index


def test_suffix_uses_other_requests_outputs_within_budget():
    rng = random.Random(2)
    p = SuffixProposer(max_global_tokens=400, max_output_tokens=200, row_cost=0.0)
    answer = [rng.randrange(500) for _ in range(60)]
    p.propose("a", [1, 2, 3], 4)                     # prompt of request a: 3 tokens
    p.propose("a", [1, 2, 3] + answer, 4)
    p.finished("a")                                 # its output joins the global store
    assert p.global_tokens == 60
    draft = p.propose("b", [9, 9] + answer[:10], 4)  # b starts writing the same answer
    assert draft == answer[10:10 + len(draft)] and len(draft) == 4

    for i in range(30):                              # many more outputs: the store stays bounded
        p.add_output([rng.randrange(500) for _ in range(90)])
        assert p.global_tokens <= 400
        assert p.global_trie.num_nodes <= 1 + 400 * p.max_depth


def test_suffix_request_memory_is_bounded():
    rng = random.Random(3)
    p = SuffixProposer(max_request_tokens=500, row_cost=0.0)
    ctx = []
    for _ in range(40):
        ctx += [rng.randrange(5000) for _ in range(100)]
        p.propose("r", ctx, 4)
        state = p._states["r"]
        assert state.trie.num_nodes <= 1 + 500 * p.max_depth
    assert p.propose("r", ctx + ctx[-300:-250], 4) == ctx[-250:-246]   # recent text still found


def _replay(p: Proposer, tokens: list[int], start: int, k: int) -> tuple[int, int]:
    """Run speculation over ``tokens`` as if the target generated tokens[start:]: returns
    (steps, proposed tokens). Acceptance is judged against the real continuation."""
    pos, steps, proposed = start, 0, 0
    while pos < len(tokens):
        draft = p.propose("r", tokens[:pos], k)
        ok = 0
        while ok < len(draft) and pos + ok < len(tokens) and draft[ok] == tokens[pos + ok]:
            ok += 1
        p.observe("r", ok, len(draft))
        proposed += len(draft)
        pos += ok + 1
        steps += 1
    return steps, proposed


@pytest.mark.parametrize("name", ["ngram", "suffix"])
def test_adaptivity_turns_off_on_random_text_and_stays_on_repeats(name):
    rng = random.Random(4)
    text = [rng.randrange(8) for _ in range(1500)]   # tiny vocabulary: matches everywhere, wrong
    steps, proposed = _replay(make_proposer(name), text, 100, 8)
    assert proposed / steps < 0.6, proposed / steps   # without adaptivity: several per step

    block = [rng.randrange(1000) for _ in range(300)]
    steps, proposed = _replay(make_proposer(name), block + block, 300, 8)
    assert steps < 300 / 3                           # >= 3 tokens per step on a re-emitted file


def test_make_proposer_errors():
    with pytest.raises(ValueError, match="vocab"):   # a draft model needs the target's vocabulary
        make_proposer("draft:/models/small")
    with pytest.raises(ValueError, match="ngram, suffix"):
        make_proposer("eagle")
    with pytest.raises(ValueError):
        NgramProposer(min_n=3, max_n=2)
    with pytest.raises(ValueError):
        SuffixProposer(max_depth=4, max_match=4)


@settings(max_examples=60, deadline=None)
@given(prompt=st.lists(st.integers(0, 9), max_size=8), output=st.lists(st.integers(0, 9), max_size=8),
       i=st.integers(-20, 20), a=st.integers(-20, 20) | st.none(), b=st.integers(-20, 20) | st.none(),
       step=st.sampled_from([None, 1, 2, -1]))
def test_token_view_reads_like_the_concatenated_list(prompt, output, i, a, b, step):
    whole, view = prompt + output, TokenView(prompt, output)
    assert len(view) == len(whole) and view[a:b:step] == whole[a:b:step]
    if -len(whole) <= i < len(whole):
        assert view[i] == whole[i]
    else:
        with pytest.raises(IndexError):
            view[i]


@pytest.mark.parametrize("name", ["ngram", "suffix"])
def test_token_view_grows_with_the_output(name):
    rng = random.Random(6)
    prompt = [rng.randrange(20) for _ in range(200)]
    output: list[int] = []
    a, b = make_proposer(name), make_proposer(name)
    view = TokenView(prompt, output)              # built once; reads the output live
    for _ in range(100):
        assert a.propose("r", view, 4) == b.propose("r", prompt + output, 4)
        output.append(rng.randrange(20))


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.7, 0.9, 0.97])
@pytest.mark.parametrize("cost", [0.0, 0.2, 0.4, 0.8])
def test_draft_length_maximizes_tokens_per_step_time(p, cost):
    a = Acceptance(row_cost=cost, prior_hits=p, prior_misses=1 - p)
    rate = [sum(p ** i for i in range(j + 1)) / (1 + cost * j) for j in range(9)]
    assert a.best_length(8) == max(range(9), key=lambda j: (rate[j], -j))
    if p < cost:
        assert a.best_length(8) == 0          # even one draft token would lose time
    if cost == 0:
        assert a.best_length(8) == 8


def test_acceptance_pauses_then_probes_and_recovers():
    a = Acceptance(row_cost=0.4)
    trace = []
    for _ in range(40):                       # every draft rejected outright
        k = a.limit(4)
        trace.append(k)
        if k:
            a.update(0, k)
    assert a.p < 0.4
    first_pause = trace.index(0)
    assert 1 <= first_pause <= 4              # a few rejected drafts, then a pause
    probes = [i for i in range(first_pause, 40) if trace[i]]
    assert probes and all(trace[i] == 1 for i in probes)     # after a pause: one-token probes
    gaps = [b - a_ - 1 for a_, b in zip(probes, probes[1:])]
    assert gaps and gaps == sorted(gaps) and gaps[-1] > gaps[0]   # pauses grow
    assert sum(trace) < 15
    for _ in range(80):                       # the text starts repeating: drafts get long again
        k = a.limit(6)
        if k:
            a.update(k, k)
    assert a.limit(6) >= 4 and a.next_cooldown == 0


def test_drafts_shrink_in_larger_decode_batches():
    a = Acceptance(row_cost=0.4, prior_hits=0.9, prior_misses=0.1)
    lengths = [a.best_length(7, batch=b) for b in (1, 2, 4, 8)]
    assert lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[-1] >= 0
    assert a.row_cost_in(1) == pytest.approx(0.4)
    assert a.row_cost_in(8) == pytest.approx(8 * 0.4 / (1 + 7 * 0.4))
    low = Acceptance(row_cost=0.4, prior_hits=0.6, prior_misses=0.4)
    assert low.best_length(7, batch=1) > 0 and low.best_length(7, batch=8) == 0
