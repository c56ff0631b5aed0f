"""Grammar compilation, matchers and batch masks (text/grammar.py) on SmolLM2's real tokenizer.

References: llguidance's own per-token check (``validate_tokens``) for the unpacked masks, and
``json`` for the texts the matchers accept. The model-level tests are in
tests/engine/test_structured.py.
"""
from __future__ import annotations

import json
import random

import pytest
import torch

from tokenfactory.engine.request import Request
from tokenfactory.engine.sampling_params import SamplingParams, StructuredOutput
from tokenfactory.model.sampler import Sampler
from tokenfactory.text.grammar import (GrammarCompiler, allocate_bitmask, allowed_tokens,
                                       compile_structured_output, compiler_for, fill_bitmasks)

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tok(gguf_tokenizer):
    return gguf_tokenizer


def test_matcher_accepts_a_valid_instance_and_terminates(tok):
    m = compile_structured_output(tok, StructuredOutput(json_schema=PERSON)).matcher()
    text = json.dumps({"name": "Ann", "age": 31, "tags": ["a", "b"]}, separators=(",", ":"))
    for t in tok.encode(text):
        assert not m.is_terminated()
        assert m.accept(t), m.error
    # the object is closed: nothing but EOS may follow, and the matcher says it is done
    assert m.is_terminated()


def test_matcher_refuses_a_token_outside_the_grammar(tok):
    m = compile_structured_output(tok, StructuredOutput(json_schema=PERSON)).matcher()
    assert not m.accept(tok.encode("hello")[0])
    assert m.error is not None and "\n" not in m.error


def test_eos_is_allowed_only_where_the_grammar_is_complete(tok):
    (eos,) = tok.eos_token_ids
    m = compile_structured_output(tok, StructuredOutput(regex=r"[0-9]{2,4}")).matcher()
    bm = allocate_bitmask(1, tok.vocab_size)
    m.fill_bitmask(bm, 0)
    assert not allowed_tokens(bm, tok.vocab_size)[0, eos]
    for piece, eos_ok in (("1", False), ("2", True), ("3", True)):
        (t,) = tok.encode(piece)
        assert m.accept(t)
        m.fill_bitmask(bm, 0)
        assert bool(allowed_tokens(bm, tok.vocab_size)[0, eos]) is eos_ok
    assert m.accept(eos) and m.is_terminated()


@pytest.mark.parametrize("spec, fragment", [
    (StructuredOutput(json_schema={"type": "integer", "minimum": 5, "maximum": 1}), "minimum"),
    (StructuredOutput(json_schema={"type": "foo"}), "foo"),
    (StructuredOutput(json_schema={"$ref": "#/$defs/missing"}), "missing"),
    (StructuredOutput(json_schema={"allOf": [{"type": "string"}, {"type": "integer"}]}),
     "nsatisfiable"),
    (StructuredOutput(regex="(unclosed"), "regex"),
])
def test_uncompilable_constraint_is_a_one_line_value_error(tok, spec, fragment):
    with pytest.raises(ValueError) as err:
        compile_structured_output(tok, spec)
    msg = str(err.value)
    assert msg.startswith("cannot compile the ") and fragment in msg and "\n" not in msg


@pytest.mark.parametrize("kwargs, fragment", [
    ({}, "exactly one"),
    ({"json_object": True, "regex": "a"}, "exactly one"),
    ({"json_schema": "{not json"}, "not valid JSON"),
    ({"json_schema": "[1, 2]"}, "JSON object"),
    ({"json_schema": {"x": float("nan")}}, "JSON document"),
    ({"regex": ""}, "non-empty"),
    ({"regex": "a" * 300_000}, "at most"),
])
def test_bad_spec_is_refused_by_sampling_params(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        SamplingParams(structured_output=kwargs)


def test_unknown_spec_field_is_a_value_error():
    with pytest.raises(ValueError, match="structured_output: .*grammar"):
        SamplingParams(structured_output={"json_object": True, "grammar": "x"})


def test_compile_cache_hits_and_is_bounded(tok):
    comp = GrammarCompiler(tok, cache_size=2)
    a = StructuredOutput(json_schema=PERSON)
    same_text = StructuredOutput(json_schema=json.dumps(PERSON, indent=2))   # same schema
    assert comp.compile(a) is comp.compile(same_text)
    assert (comp.num_compilations, comp.num_hits) == (1, 1)
    comp.compile(StructuredOutput(json_object=True))
    comp.compile(StructuredOutput(regex="[ab]+"))        # evicts the least recently used: PERSON
    assert len(comp) == 2 and comp.num_compilations == 3
    comp.compile(a)
    assert comp.num_compilations == 4
    # strict and lenient compile differently, so they are cached apart
    comp.compile(StructuredOutput(json_schema=PERSON, strict=False))
    assert comp.num_compilations == 5
    assert compiler_for(tok) is compiler_for(tok)


def _walk(tok, spec, steps, seed):
    """A matcher advanced by `steps` random allowed tokens."""
    m = compile_structured_output(tok, spec).matcher()
    rnd = random.Random(seed)
    bm = allocate_bitmask(1, tok.vocab_size)
    for _ in range(steps):
        m.fill_bitmask(bm, 0)
        allowed = allowed_tokens(bm, tok.vocab_size)[0].nonzero()[:, 0].tolist()
        allowed = [t for t in allowed if t not in tok.eos_token_ids]
        if not allowed:
            break
        assert m.accept(rnd.choice(allowed))
    return m


@pytest.mark.parametrize("rows, parallel", [(2, False), (6, True)])
def test_batch_masks_match_llguidance_token_checks_and_isolate_a_broken_row(
        tok, rows, parallel, monkeypatch):
    import tokenfactory.text.grammar as grammar
    monkeypatch.setattr(grammar, "PARALLEL_FILL_MIN_ROWS", 4 if parallel else 1 << 30)
    specs = [StructuredOutput(json_schema=PERSON), StructuredOutput(json_object=True),
             StructuredOutput(regex=r"[a-z ]{3,30}\.")]
    matchers = [_walk(tok, specs[i % 3], 2 + i, seed=i) for i in range(rows)]
    broken = None if parallel else rows - 1   # (a failed matcher makes the fill serial)
    if broken is not None:
        assert not matchers[broken].accept(tok.eos_token_id)     # now in an error state
    bitmask = allocate_bitmask(rows, tok.vocab_size)
    errors = fill_bitmasks(matchers, bitmask)
    assert list(errors) == ([] if broken is None else [broken])
    allowed = allowed_tokens(bitmask, tok.vocab_size + 64)     # wider logits than the vocab
    assert not allowed[:, tok.vocab_size:].any()
    if broken is not None:
        assert "\n" not in errors[broken] and not allowed[broken].any()
    rnd = random.Random(rows)
    for i in range(rows if broken is None else rows - 1):
        ok = allowed[i].nonzero()[:, 0].tolist()
        assert ok
        probe = rnd.sample(ok, min(20, len(ok))) + rnd.sample(range(tok.vocab_size), 40)
        for t in probe:   # llguidance's own check of one token from this state
            assert (matchers[i].raw.validate_tokens([t]) == 1) is bool(allowed[i, t]), t


def test_sampler_masks_grammar_rows_and_leaves_the_others_alone(tok):
    """Rows with a grammar only draw allowed tokens; rows without get exactly the tokens they
    get in a batch with no grammar at all; a broken matcher fails its own row only."""
    vocab = tok.vocab_size

    def req(i, spec=None, temperature=0.7):
        r = Request(f"r{i}", [1, 2, 3], SamplingParams(temperature=temperature, seed=i,
                                                       structured_output=spec))
        if spec is not None:
            r.grammar = compile_structured_output(tok, spec).matcher()
        return r

    torch.manual_seed(0)
    logits = torch.randn(5, vocab) * 3
    plain = [req(0), req(1, temperature=0.0), req(2)]
    cons = [req(3, StructuredOutput(json_schema=PERSON)), req(4, StructuredOutput(json_object=True))]
    mixed = [plain[0], cons[0], plain[1], cons[1], plain[2]]
    order = [0, 3, 1, 4, 2]
    alone = Sampler(seed=0)(logits[[0, 1, 2]], plain).token_ids
    out = Sampler(seed=0)(logits[order], mixed).token_ids
    assert [out[0], out[2], out[4]] == alone
    for k, r in ((1, cons[0]), (3, cons[1])):
        assert out[k] is not None and r.grammar.accept(out[k])
        assert tok.decode([out[k]]).startswith("{")
    # a broken matcher: its row fails, the others are unchanged
    assert not cons[1].grammar.accept(tok.eos_token_id)
    out2 = Sampler(seed=0)(logits[order], mixed).token_ids
    assert out2[3] is None and cons[1].sampling_error.startswith("structured output:")
    assert [out2[0], out2[2], out2[4]] == alone and cons[0].sampling_error is None


@pytest.mark.parametrize("rows", [[0, 1, 2, 3], [1, 3]])
def test_mask_logits_equals_masked_fill(rows):
    from tokenfactory.text.grammar import mask_logits
    g = torch.Generator().manual_seed(len(rows))
    vocab = 1000                                     # logits wider than the 31-word bitmask
    bitmask = torch.randint(-2**31, 2**31 - 1, (len(rows), 31), dtype=torch.int32, generator=g)
    logits = torch.randn(4, vocab, generator=g)
    want = logits.clone()
    want[rows] = want[rows].masked_fill(~allowed_tokens(bitmask, vocab), float("-inf"))
    assert torch.equal(mask_logits(logits, rows, bitmask), want)
    assert torch.equal(logits, want)                 # in place
