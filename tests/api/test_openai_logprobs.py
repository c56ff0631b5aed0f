"""OpenAI log probabilities, ``n`` > 1 and ``logit_bias`` through the official SDK, against a
real forward pass (the demo checkpoint in float32) and `transformers` on the same weights.

The reference is transformers' log-softmax over the same token ids, so a wrong position, a
wrong sign, a missing temperature-1 normalisation or top-k entries in the wrong order all show.
"""
from __future__ import annotations

import math

import openai
import pytest
import torch

from .conftest import live_server

TOL = 2e-3   # float32 paged attention vs transformers' eager attention, in nats


@pytest.fixture(scope="module")
def lp_server():
    from tokenfactory.engine.async_engine import AsyncEngine
    from tokenfactory.engine.llm import build_engine_core
    from tokenfactory.model.demo import ensure_demo_checkpoint

    path = ensure_demo_checkpoint()
    core = build_engine_core(path, dtype="float32", compile=False, max_model_len=512,
                             kv_cache_memory=16 << 20)
    with live_server(core.tokenizer, engine=AsyncEngine(core), served_model_name="demo",
                     random_weights=True) as srv:
        srv.model_path = path
        yield srv


@pytest.fixture(scope="module")
def hf(lp_server):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(lp_server.model_path,
                                                             dtype=torch.float32).eval()


@pytest.fixture
def client(lp_server):
    return openai.OpenAI(base_url=lp_server.base_url + "/v1", api_key="x", max_retries=0)


def _ref_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """(len(ids), V) log-probabilities of the next token after each prefix of ``ids``."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def _ids_of(lp_server, entries) -> list[int]:
    """The token ids of logprob entries, from their exact bytes (each is one vocabulary entry)."""
    tok = lp_server.app.state.ctx.tokenizer
    by_bytes = {}
    from tokenfactory.text.grammar import compiler_for
    llt = compiler_for(tok).ll_tokenizer
    for tid in range(tok.vocab_size):
        by_bytes.setdefault(llt.decode_bytes([tid]), tid)
    return [by_bytes[bytes(e.bytes)] for e in entries]


MESSAGES = [{"role": "user", "content": "Name three colours."}]


def test_chat_logprobs_match_transformers_streamed_or_not(lp_server, hf, client):
    kw = dict(model="demo", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
              top_logprobs=3, extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    assert b"".join(bytes(e.bytes) for e in content).decode() == r.choices[0].message.content
    ctx = lp_server.app.state.ctx
    prompt = ctx.encode(ctx.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True))
    out_ids = _ids_of(lp_server, content)
    ref = _ref_logprobs(hf, prompt + out_ids)
    for i, e in enumerate(content):
        row = ref[len(prompt) - 1 + i]
        assert out_ids[i] == int(row.argmax())              # greedy: the best token was chosen
        assert abs(e.logprob - float(row[out_ids[i]])) < TOL
        assert len(e.top_logprobs) == 3
        best = torch.topk(row, 3)
        assert [t.logprob for t in e.top_logprobs] == sorted(
            (t.logprob for t in e.top_logprobs), reverse=True)
        for t, want in zip(e.top_logprobs, best.values.tolist()):
            assert abs(t.logprob - want) < TOL
        assert e.top_logprobs[0].token == e.token
    # streamed: the same entries, spread over the chunks that carry their tokens
    streamed = []
    for chunk in client.chat.completions.create(stream=True, **kw):
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
            streamed += chunk.choices[0].logprobs.content
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in content]
    assert all(abs(a.logprob - b.logprob) < 1e-5 for a, b in zip(streamed, content))
    lp_server.assert_no_leaks()


def test_chat_without_logprobs_has_none_and_top_needs_logprobs(lp_server, client):
    r = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=2)
    assert r.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=2,
                                       top_logprobs=2)
    assert "top_logprobs" in str(err.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=2,
                                       logprobs=True, top_logprobs=21)


def test_completion_echo_logprobs_score_the_prompt(lp_server, hf, client):
    """What evaluation harnesses do for log-likelihood: echo the prompt with its logprobs."""
    prompt = "The quick brown fox jumps over the lazy dog"
    r = client.completions.create(model="demo", prompt=prompt, max_tokens=1, echo=True,
                                  logprobs=2, temperature=0)
    lp = r.choices[0].logprobs
    ids = lp_server.app.state.ctx.encode(prompt, add_special_tokens=True)
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None
    # the prompt's BOS token is scored (as None) but not part of the echoed text
    assert lp.tokens[0] == "<|begin_of_text|>" and "".join(lp.tokens[1:]) == r.choices[0].text
    assert lp.text_offset[:2] == [0, 0]
    ref = _ref_logprobs(hf, ids)
    for pos in range(1, len(ids)):
        assert abs(lp.token_logprobs[pos] - float(ref[pos - 1, ids[pos]])) < TOL
        assert len(lp.top_logprobs[pos]) == 2
        assert max(lp.top_logprobs[pos].values()) == pytest.approx(
            float(ref[pos - 1].max()), abs=TOL)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # the generated token: the argmax after the whole prompt
    assert lp.token_logprobs[-1] == pytest.approx(float(ref[-1].max()), abs=TOL)
    # streamed: the prompt's entries first, then the new token's
    toks = []
    for chunk in client.completions.create(model="demo", prompt=prompt, max_tokens=1, echo=True,
                                           logprobs=2, temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            toks += chunk.choices[0].logprobs.tokens
    assert toks == lp.tokens
    lp_server.assert_no_leaks()


def test_n_choices_seeded_reproducible_and_summed(lp_server, client):
    kw = dict(model="demo", messages=MESSAGES, max_tokens=5, temperature=1.0, seed=7,
              extra_body={"ignore_eos": True})
    r = client.chat.completions.create(n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert r.usage.completion_tokens == 15
    assert r.usage.total_tokens == r.usage.prompt_tokens + 15
    one = client.chat.completions.create(n=1, **kw)
    assert one.choices[0].message.content == texts[0]       # choice 0 uses the seed itself
    again = client.chat.completions.create(n=3, **kw)
    assert [c.message.content for c in again.choices] == texts
    assert len(set(texts)) > 1   # choices 1, 2 use seed + 1, seed + 2 (random weights: 5 tokens)
    # streamed: each choice's deltas, by index, reassemble the same texts
    parts = {0: "", 1: "", 2: ""}
    finished = set()
    usage = None
    for chunk in client.chat.completions.create(n=3, stream=True,
                                                stream_options={"include_usage": True}, **kw):
        for c in chunk.choices:
            parts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
        usage = chunk.usage or usage
    assert [parts[i] for i in range(3)] == texts and finished == {0, 1, 2}
    assert usage.completion_tokens == 15
    lp_server.assert_no_leaks()


def test_n_completions(lp_server, client):
    r = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=3, n=2,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == r.choices[1].text           # greedy: the same answer twice
    assert r.usage.completion_tokens == 6
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="demo", prompt="x", max_tokens=1, n=17)
    lp_server.assert_no_leaks()


@pytest.mark.parametrize("bias, fragment", [
    ({"abc": 1}, "token ids"), ({"-1": 1}, "not in"), ({"999999": 1}, "not in"),
    ({"5": 101}, "[-100, 100]"), ({str(i): 1 for i in range(301)}, "at most 300"),
])
def test_logit_bias_bounds(lp_server, client, bias, fragment):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=1,
                                       logit_bias=bias)
    assert fragment in str(err.value) and err.value.body["param"] == "logit_bias"


def test_logit_bias_bans_and_forces_tokens(lp_server, hf, client):
    """-100 removes the greedy choice (the runner-up comes instead); +100 forces a token."""
    kw = dict(model="demo", messages=MESSAGES, max_tokens=1, temperature=0, logprobs=True,
              top_logprobs=2)
    plain = client.chat.completions.create(**kw).choices[0].logprobs.content[0]
    best, second = _ids_of(lp_server, plain.top_logprobs)
    banned = client.chat.completions.create(logit_bias={str(best): -100}, **kw)
    assert _ids_of(lp_server, banned.choices[0].logprobs.content) == [second]
    forced_id = 7 if 7 not in (best, second) else 8
    forced = client.chat.completions.create(logit_bias={str(forced_id): 100}, **kw)
    assert _ids_of(lp_server, forced.choices[0].logprobs.content) == [forced_id]
    assert math.isfinite(forced.choices[0].logprobs.content[0].logprob)
    lp_server.assert_no_leaks()


# ------------------------------------------------------------- several prompts per request
PROMPTS = ["The quick brown fox", "Once upon a time there was"]


def test_completion_several_prompts_each_scored_and_numbered(lp_server, hf, client):
    """prompt as a list of strings and as a list of token-id lists (lm-eval's default shape):
    choice p * n + j belongs to prompt p, each echoes its own prompt with transformers'
    log-probabilities, and usage counts every prompt once."""
    ctx = lp_server.app.state.ctx
    ids = [ctx.encode(p, add_special_tokens=True) for p in PROMPTS]
    kw = dict(model="demo", max_tokens=2, n=2, temperature=0, echo=True, logprobs=1,
              extra_body={"ignore_eos": True})
    by_text = client.completions.create(prompt=PROMPTS, **kw)
    by_ids = client.completions.create(prompt=ids, **kw)
    for r in (by_text, by_ids):
        assert [c.index for c in r.choices] == [0, 1, 2, 3]
        assert r.usage.prompt_tokens == sum(map(len, ids))
        assert r.usage.completion_tokens == 8
        for c in r.choices:
            p = c.index // 2
            assert c.text.startswith(PROMPTS[p])
            lp = c.logprobs
            assert len(lp.tokens) == len(ids[p]) + 2 and lp.token_logprobs[0] is None
            ref = _ref_logprobs(hf, ids[p])
            for pos in range(1, len(ids[p])):
                assert abs(lp.token_logprobs[pos] - float(ref[pos - 1, ids[p][pos]])) < TOL
            # greedy: the first new token is the argmax after the whole prompt
            assert lp.token_logprobs[len(ids[p])] == pytest.approx(float(ref[-1].max()),
                                                                   abs=TOL)
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]
    assert by_text.choices[0].text != by_text.choices[2].text
    # one prompt alone gives what its choices in the batch gave
    alone = client.completions.create(prompt=PROMPTS[1], **kw)
    assert [c.text for c in alone.choices] == [c.text for c in by_text.choices[2:]]
    # streamed: each index reassembles its choice; the usage chunk sums the prompts
    parts: dict[int, str] = {}
    usage = None
    for chunk in client.completions.create(prompt=ids, stream=True,
                                           stream_options={"include_usage": True}, **kw):
        for c in chunk.choices:
            parts[c.index] = parts.get(c.index, "") + c.text
        usage = chunk.usage or usage
    assert [parts[i] for i in range(4)] == [c.text for c in by_text.choices]
    assert usage.prompt_tokens == sum(map(len, ids)) and usage.completion_tokens == 8
    lp_server.assert_no_leaks()


@pytest.mark.parametrize("prompt, fragment", [
    ([[1, 2, 3], [4, 10**6]], "prompt[1]: token ids must be in [0, "),
    ([[1, 2, 3], [-1]], "prompt[1]: token ids must be in [0, "),
    ([[1, 2], []], "prompt[1] is empty"),
    ([], "empty"),
    (["a", 1], "prompt"),
    ([[1]] * 257, "at most 256 prompts"),
])
def test_completion_bad_prompts_are_openai_400s(lp_server, client, prompt, fragment):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="demo", prompt=prompt, max_tokens=1)
    assert fragment in str(err.value)
    assert err.value.body["type"] == "invalid_request_error"
    lp_server.assert_no_leaks()


def test_too_many_choices_is_400(lp_server, client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="demo", prompt=["a"] * 17, n=16, max_tokens=1)
    assert "choices per request" in str(err.value)


# ------------------------------------------------------- n choices share the prompt's pages
def test_n_choices_compute_the_prompt_once(lp_server, client):
    """n=4 on a 200-token prompt: the first choice prefills it, the other three read every
    full page of it from the prefix cache (engine counters), and still sample differently."""
    ctx = lp_server.app.state.ctx
    bs = ctx.block_size
    for api in ("completions", "chat"):
        before = ctx.engine.stats()
        if api == "completions":   # token ids nobody sent before: nothing cached yet
            prompt = [(i * 7919) % 4000 + 100 for i in range(200)]
            r = client.completions.create(model="demo", prompt=prompt, max_tokens=3, n=4,
                                          seed=3, extra_body={"ignore_eos": True})
            texts = [c.text for c in r.choices]
            num_prompt = 200
        else:
            content = " ".join(f"w{i}" for i in range(120))
            r = client.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": content}], max_tokens=3,
                n=4, seed=3, extra_body={"ignore_eos": True})
            texts = [c.message.content for c in r.choices]
            num_prompt = r.usage.prompt_tokens
        after = ctx.engine.stats()
        assert num_prompt >= 200
        hits = after.prefix_cache_hits - before.prefix_cache_hits
        assert hits == 3 * ((num_prompt - 1) // bs) * bs, (api, hits, num_prompt)
        assert len(set(texts)) > 1
    lp_server.assert_no_leaks()
