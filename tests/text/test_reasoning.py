"""The reasoning-budget grammar (text/reasoning.py) on llguidance and the demo tokenizer: the
section is closed at exactly the budget, a model may close it earlier itself, a zero budget
is an empty section, and a constrained reply follows the section. Tokens are drawn at random
from what each mask allows (a stand-in for any model), and text is fed token by token."""
from __future__ import annotations

import random

import pytest

from tokenfactory.engine.sampling_params import StructuredOutput
from tokenfactory.text.grammar import allowed_tokens, allocate_bitmask, \
    compile_structured_output, special_tokens
from tokenfactory.text.reasoning import effort_budget, plan_reasoning, reasoning_grammar
from tokenfactory.text.tool_parsers import render_tool_call_text, tool_call_grammar


def _matcher(tok, lark):
    return compile_structured_output(tok, StructuredOutput(lark=lark)).matcher()


def _sample(tok, lark, steps, seed=0):
    """Token ids drawn uniformly from each step's allowed set (EOS excluded)."""
    m, rng, out = _matcher(tok, lark), random.Random(seed), []
    eos = set(tok.eos_token_ids)
    for _ in range(steps):
        mask = allocate_bitmask(1, m.vocab_size)
        m.fill_bitmask(mask, 0)
        allowed = [t for t in allowed_tokens(mask, m.vocab_size)[0].nonzero().flatten().tolist()
                   if t not in eos]
        out.append(rng.choice(allowed))
        assert m.accept(out[-1])
    return out


def _accepts(tok, lark, text):
    m = _matcher(tok, lark)
    return all(m.accept(t) for t in tok.encode(text))


@pytest.mark.parametrize("budget,seed", [(1, 0), (7, 1), (40, 2)])
def test_the_section_closes_at_the_budget(demo_tokenizer, budget, seed):
    tok = demo_tokenizer
    lark = reasoning_grammar(budget, special_tokens=special_tokens(tok),
                             end_token_ids=sorted(tok.eos_token_ids))
    opened = len(tok.encode("<think>"))
    ids = _sample(tok, lark, opened + budget + 12, seed)
    pieces = [tok.decode([i], skip_special_tokens=False) for i in ids]
    text = "".join(pieces)
    assert text.startswith("<think>\n") and "\n</think>\n\n" in text
    close = text.index("\n</think>\n\n")
    starts = [sum(map(len, pieces[:i])) for i in range(len(pieces))]
    first_close = max(i for i, s in enumerate(starts) if s <= close)
    assert first_close - opened == budget


def test_the_model_may_close_early_and_a_zero_budget_is_empty(demo_tokenizer):
    tok = demo_tokenizer
    lark = reasoning_grammar(64)
    assert _accepts(tok, lark, "<think>\nShort.\n</think>\n\nThe answer.")
    assert not _accepts(tok, lark, "The answer without thinking.")
    assert not _accepts(tok, lark, "<think>\nx </think> y\n</think>\n\n")   # one close only
    empty = reasoning_grammar(0)
    assert _accepts(tok, empty, "<think>\n\n</think>\n\nAnswer.")
    assert not _accepts(tok, empty, "<think>\nA thought.\n</think>\n\nAnswer.")
    inside = reasoning_grammar(64, inside=True)   # the prompt opened the section
    assert _accepts(tok, inside, "A thought.\n</think>\n\nAnswer.")


def test_a_constrained_reply_follows_the_section(demo_tokenizer):
    tok = demo_tokenizer
    specials = special_tokens(tok)
    tools = [("weather", {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}, True)]
    lark = reasoning_grammar(32, reply_lark=tool_call_grammar(tools, "hermes",
                                                              choice="required",
                                                              special_tokens=specials),
                             special_tokens=specials)
    call = render_tool_call_text("weather", {"city": "Oslo"}, "hermes")
    assert _accepts(tok, lark, "<think>\nCall it.\n</think>\n\n" + call)
    assert not _accepts(tok, lark, "<think>\nCall it.\n</think>\n\nNo call.")
    # free text after the section may hold special tokens (a tool-call marker)
    assert _accepts(tok, reasoning_grammar(24, special_tokens=specials),
                    "<think>\nHm.\n</think>\n\n" + call)


def test_plans():
    qwen = "{% if enable_thinking %}<think>{% endif %}"
    r1 = "<think>"
    assert plan_reasoning(template=qwen, thinking_type="disabled", budget_tokens=None,
                          effort=None, max_tokens=100).switch is False
    assert plan_reasoning(template=r1, thinking_type="disabled", budget_tokens=None,
                          effort=None, max_tokens=100).budget == 0
    both = plan_reasoning(template=qwen, thinking_type="enabled", budget_tokens=2000,
                          effort="low", max_tokens=4000)
    assert (both.switch, both.budget) == (True, 1000)
    assert plan_reasoning(template=r1, thinking_type=None, budget_tokens=None, effort="high",
                          max_tokens=4000).budget is None
    assert effort_budget("medium", 100) == 50 and effort_budget(None, 100) is None
    with pytest.raises(ValueError):
        reasoning_grammar(-1)
