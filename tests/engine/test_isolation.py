"""One request never fails, changes or starves another (issue 13), on the real PyTorch executor
and sampler: hostile sampling parameters are rejected or sampled safely, a fault in one
request's sampling or forward pass fails that request alone, and admission is fair by tenant.

The victim is a greedy request; its tokens alone are the reference, and with attackers in its
batches it must produce exactly those tokens and finish normally, with no page leaked.
"""
from __future__ import annotations

import asyncio
import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenfactory.engine.async_engine import AsyncEngine, EngineOverloadedError
from tokenfactory.engine.core import EngineConfig, EngineCore
from tokenfactory.engine.executor import ScriptedExecutor
from tokenfactory.engine.sampling_params import SamplingParams

_rng = random.Random(13)
VICTIM_PROMPT = [_rng.randrange(3, 512) for _ in range(11)]
VICTIM = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
VICTIM_SEEDED = SamplingParams(temperature=0.8, top_p=0.95, seed=7, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def core(tiny_llama_dir) -> EngineCore:
    from tokenfactory.model.runner import TorchExecutor
    ex = TorchExecutor(tiny_llama_dir, dtype="float32", seed=0)
    return EngineCore(ex, EngineConfig(num_kv_blocks=256, block_size=8), eos_token_ids=[2],
                      model_max_len=ex.max_model_len)


def run(core: EngineCore, requests) -> dict:
    """Add ``(rid, prompt, params)`` requests, step to completion, return final outputs."""
    for rid, prompt, params in requests:
        core.add_request(rid, prompt, params)
    finished = {}
    for _ in range(1000):
        if not core.has_unfinished_requests():
            break
        for out in core.step():      # never raises for a request's sake
            if out.finished:
                finished[out.request_id] = out
    assert not core.has_unfinished_requests()
    assert core.num_free_blocks() == core.kv.num_blocks, "pages leaked"
    return finished


@pytest.fixture(scope="module")
def reference(core) -> dict[str, list[int]]:
    got = {}
    for name, params in (("greedy", VICTIM), ("seeded", VICTIM_SEEDED)):
        out = run(core, [(f"ref-{name}", VICTIM_PROMPT, params)])[f"ref-{name}"]
        assert out.outputs[0].finish_reason == "length"
        got[name] = out.outputs[0].token_ids
    assert len(got["greedy"]) == 40
    return got


def assert_victim_unharmed(out, expected: list[int]) -> None:
    assert out.error is None, out.error
    assert out.outputs[0].finish_reason == "length"
    assert out.outputs[0].token_ids == expected


# name -> SamplingParams kwargs; the engine must either refuse them at construction (ValueError)
# or run them without harming anyone
ATTACKS = {
    "top_k_2**63": dict(top_k=2**63, temperature=0.9),
    "top_k_10**20": dict(top_k=10**20, temperature=0.9, seed=3),
    "top_k_float_1e20": dict(top_k=1e20),
    "top_k_2**70_neg": dict(top_k=-(2**70)),
    "temperature_1e-300": dict(temperature=1e-300),
    "temperature_subnormal_top_k": dict(temperature=5e-324, top_k=2**63 - 1),
    "temperature_nan": dict(temperature=math.nan),
    "temperature_inf": dict(temperature=math.inf),
    "temperature_huge": dict(temperature=1e300),
    "temperature_max": dict(temperature=100.0, seed=1),
    "temperature_just_above_floor": dict(temperature=1e-5, top_p=1e-300),
    "repetition_1e-300": dict(repetition_penalty=1e-300, temperature=1.0),
    "repetition_1e-300_greedy": dict(repetition_penalty=1e-300, temperature=0.0),
    "repetition_1e-300_cold": dict(repetition_penalty=1e-300, temperature=1e-5, seed=5),
    "repetition_100": dict(repetition_penalty=100.0, temperature=0.5),
    "repetition_nan": dict(repetition_penalty=math.nan),
    "penalties_extreme": dict(presence_penalty=-2.0, frequency_penalty=-2.0, temperature=1.5),
    "top_p_nan": dict(top_p=math.nan),
    "min_p_inf": dict(min_p=math.inf),
    "min_p_subnormal": dict(min_p=5e-324, temperature=0.7),
    "stop_ids_million": dict(stop_token_ids=list(range(1_000_000))),
    "stop_ids_cover_vocab_min_tokens": dict(stop_token_ids=list(range(1024)), min_tokens=3),
    "stop_ids_cover_vocab": dict(stop_token_ids=list(range(1024)), temperature=0.3),
    "stop_ids_huge_value": dict(stop_token_ids=[2**63]),
    "seed_2**64": dict(seed=2**64),
    "seed_max": dict(seed=2**64 - 1, temperature=2.0),
    "seed_min": dict(seed=-(2**63), temperature=2.0),
    "max_tokens_nan": dict(max_tokens=math.nan),
    "logprobs_huge": dict(logprobs=2**63),
    "logprobs_20_prompt_logprobs_20": dict(logprobs=20, prompt_logprobs=20, temperature=1e-9),
    "stop_strings_many": dict(stop=["x"] * 10_000),
}


def build_attackers() -> tuple[list, list[str]]:
    accepted, rejected = [], []
    for i, (name, kw) in enumerate(ATTACKS.items()):
        kw = {"max_tokens": 6, **kw}
        try:
            params = SamplingParams(**kw)
        except ValueError as exc:
            assert str(exc) and "\n" not in str(exc)
            rejected.append(name)
            continue
        rng = random.Random(i)
        prompt = [rng.randrange(3, 512) for _ in range(5 + i % 7)]
        accepted.append((f"attack-{name}", prompt, params))
    return accepted, rejected


def test_victim_unharmed_by_hostile_parameters(core, reference):
    attackers, rejected = build_attackers()
    assert {"top_k_float_1e20", "temperature_nan", "temperature_inf", "temperature_huge",
            "repetition_nan", "top_p_nan", "min_p_inf", "stop_ids_million", "seed_2**64",
            "max_tokens_nan", "logprobs_huge", "stop_ids_huge_value", "top_k_2**70_neg",
            "stop_strings_many"} == set(rejected)
    # values that are representable but extreme are normalized, not refused
    assert SamplingParams(top_k=2**63).top_k == 2**31 - 1
    assert SamplingParams(temperature=1e-300).greedy
    # the victim is in the same batches as every accepted attacker
    finished = run(core, attackers + [("victim", VICTIM_PROMPT, VICTIM),
                                      ("victim-seeded", VICTIM_PROMPT, VICTIM_SEEDED)])
    assert_victim_unharmed(finished["victim"], reference["greedy"])
    assert_victim_unharmed(finished["victim-seeded"], reference["seeded"])
    for rid, _, params in attackers:
        out = finished[rid]
        if rid == "attack-stop_ids_cover_vocab_min_tokens":
            # every token is a stop id and may not be emitted yet: nothing can be sampled
            assert out.outputs[0].finish_reason == "error" and "sampling failed" in out.error
            continue
        assert out.error is None, (rid, out.error)
        assert out.outputs[0].finish_reason in ("stop", "length"), rid
        assert all(0 <= t < 512 for t in out.outputs[0].token_ids)
    # a penalty of 1e-300 rewards repeating prompt tokens without overflowing to NaN
    out = finished["attack-repetition_1e-300_greedy"]
    prompt = next(p for rid, p, _ in attackers if rid == "attack-repetition_1e-300_greedy")
    assert out.outputs[0].token_ids[0] in prompt


class FaultySampler:
    """Wraps the executor's real sampler: turns one request's logits row non-finite (from its
    ``at``-th output on) before the real sampler sees the batch."""

    def __init__(self, real, victim_id: str, at: int, value: float):
        self.real, self.victim_id, self.at, self.value = real, victim_id, at, value

    def __call__(self, logits, requests, *grammar):
        logits = logits.clone()
        for i, r in enumerate(requests):
            if r.request_id == self.victim_id and len(r.output_token_ids) >= self.at:
                logits[i, 17] = self.value
        return self.real(logits, requests, *grammar)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_logits_fail_only_their_request(core, reference, value):
    real = core.executor.sampler
    core.executor.sampler = FaultySampler(real, "doomed", at=3, value=value)
    try:
        finished = run(core, [("doomed", [5, 6, 7, 8], SamplingParams(max_tokens=20, seed=1)),
                              ("victim", VICTIM_PROMPT, VICTIM),
                              ("victim-seeded", VICTIM_PROMPT, VICTIM_SEEDED)])
    finally:
        core.executor.sampler = real
    doomed = finished["doomed"]
    assert doomed.outputs[0].finish_reason == "error"
    assert "non-finite logits" in doomed.error
    assert len(doomed.outputs[0].token_ids) == 3      # what it produced before the fault
    assert_victim_unharmed(finished["victim"], reference["greedy"])
    assert_victim_unharmed(finished["victim-seeded"], reference["seeded"])


def test_kernel_error_while_drawing_fails_only_its_request(core, reference, monkeypatch):
    """The draw for one row raises (as torch.multinomial does on a bad distribution): the
    batched draw fails, the sampler retries row by row, and only that row's request fails."""
    sampler = core.executor.sampler
    real_draw = sampler._draw

    def draw(probs, requests):
        if any(r.request_id == "doomed" and len(r.output_token_ids) >= 2 for r in requests):
            raise RuntimeError("injected: probability tensor contains either inf, nan or < 0")
        return real_draw(probs, requests)

    monkeypatch.setattr(sampler, "_draw", draw)
    finished = run(core, [("doomed", [9, 10, 11], SamplingParams(max_tokens=20, seed=2)),
                          ("victim", VICTIM_PROMPT, VICTIM),
                          ("victim-seeded", VICTIM_PROMPT, VICTIM_SEEDED)])
    doomed = finished["doomed"]
    assert doomed.outputs[0].finish_reason == "error" and "injected" in doomed.error
    assert len(doomed.outputs[0].token_ids) == 2
    assert_victim_unharmed(finished["victim"], reference["greedy"])
    assert_victim_unharmed(finished["victim-seeded"], reference["seeded"])


def test_forward_pass_fault_fails_only_its_request(core, reference, monkeypatch):
    """A forward pass that raises whenever one request is in the batch: each chunk is retried
    alone, so only that request fails."""
    ex = core.executor
    real_execute = ex.execute

    def execute(plan):
        if any(r.request_id == "doomed" and r.output_index >= 4 for r in plan.requests):
            raise RuntimeError("injected kernel fault")
        return real_execute(plan)

    monkeypatch.setattr(ex, "execute", execute)
    finished = run(core, [("doomed", [9, 10, 11], SamplingParams(max_tokens=20, seed=2)),
                          ("victim", VICTIM_PROMPT, VICTIM),
                          ("victim-seeded", VICTIM_PROMPT, VICTIM_SEEDED)])
    doomed = finished["doomed"]
    assert doomed.outputs[0].finish_reason == "error" and "injected" in doomed.error
    assert len(doomed.outputs[0].token_ids) == 4
    assert_victim_unharmed(finished["victim"], reference["greedy"])
    assert_victim_unharmed(finished["victim-seeded"], reference["seeded"])


def test_out_of_vocabulary_prompt_ids_are_refused(core):
    for ids in ([1, 512], [-1, 4]):
        with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, 512\)"):
            core.add_request("oov", ids, SamplingParams())
    assert core.num_waiting == 0


# ---------------------------------------------------------------- extremes of every type
def _edge_floats(lo: float, hi: float, *edges: float):
    return st.one_of(st.floats(lo, hi, allow_subnormal=True), st.sampled_from([lo, hi, *edges]))


ANY_FLOAT = st.one_of(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
                      st.sampled_from([math.nan, math.inf, -math.inf, -5e-324, 1e308]))
ANY_INT = st.one_of(st.integers(-(2**70), 2**70),
                    st.sampled_from([-1, -(2**63) - 1, 2**63, 2**64, 10**20]))
# Valid values, at the edges of their ranges (subnormals, 0, the bounds, huge ints).
VALID = dict(
    temperature=_edge_floats(0.0, 100.0, -0.0, 5e-324, 1e-300, 9.99e-6, 1e-5, 1.0),
    top_p=_edge_floats(5e-324, 1.0, 1e-300, 1e-45),
    min_p=_edge_floats(0.0, 1.0, 5e-324, 1e-300),
    presence_penalty=_edge_floats(-2.0, 2.0, 5e-324),
    frequency_penalty=_edge_floats(-2.0, 2.0, -5e-324),
    repetition_penalty=_edge_floats(5e-324, 100.0, 1e-300, 1e-30, 1.0),
    top_k=st.one_of(st.integers(-1, 2**70), st.sampled_from([0, -1, 1, 511, 512, 2**63])),
    seed=st.none() | st.integers(-(2**63), 2**64 - 1),
    min_tokens=st.integers(0, 3),
    max_tokens=st.integers(3, 6),
    stop_token_ids=st.one_of(
        st.lists(st.integers(0, 2**31 - 1), max_size=8),
        st.builds(lambda n, lo: list(range(lo, lo + n)),
                  st.sampled_from([0, 1, 511, 1024]), st.sampled_from([0, 3, 256, 500]))),
    logprobs=st.none() | st.integers(0, 20),
)
# Anything the field's type allows (each example replaces at most one field with one).
WILD = dict(
    **{k: ANY_FLOAT for k in ("temperature", "top_p", "min_p", "presence_penalty",
                              "frequency_penalty", "repetition_penalty")},
    top_k=ANY_INT, seed=ANY_INT, min_tokens=ANY_INT, max_tokens=ANY_INT, logprobs=ANY_INT,
    stop_token_ids=st.one_of(st.lists(ANY_INT, max_size=4),
                             st.sampled_from([1025, 50_000]).map(lambda n: list(range(n)))),
)
WILD_FIELD = st.none() | st.sampled_from(sorted(WILD)).flatmap(
    lambda k: WILD[k].map(lambda v: (k, v)))


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(kw=st.fixed_dictionaries(VALID), wild=WILD_FIELD)
def test_extreme_parameters_never_harm_a_neighbour(core, reference, kw, wild):
    """Valid values at the edges of their ranges are accepted and run; any value of the type
    is either refused at construction (ValueError) or runs. Either way the greedy neighbour's
    tokens are unchanged and no page leaks."""
    if wild is None:
        params = SamplingParams(**kw)           # edge-of-range but valid: must be accepted
    else:
        kw[wild[0]] = wild[1]
        try:
            params = SamplingParams(**kw)
        except ValueError as exc:
            assert "\n" not in str(exc) and len(str(exc)) < 300
            return
    victim = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    try:
        core.add_request("attacker", [3, 4, 5, 6, 7], params)
    except ValueError:      # e.g. max_tokens beyond the context: refused before queueing
        assert wild is not None and core.num_waiting == 0
        return
    finished = run(core, [("victim", VICTIM_PROMPT, victim)])
    assert_victim_unharmed(finished["victim"], reference["greedy"][:8])
    attacker = finished["attacker"]
    assert attacker.finished and attacker.outputs[0].finish_reason in ("stop", "length", "error")
    if attacker.outputs[0].finish_reason == "error":
        # only possible when every token is banned until min_tokens (stop ids cover the vocab)
        assert params.min_tokens > 0 and len(set(params.stop_token_ids) & set(range(512))) >= 511


def test_sampler_does_not_rebuild_stop_sets_per_step(core):
    """Stop ids are turned into a set / index tensor once per request, not once per step."""
    params = SamplingParams(stop_token_ids=list(range(600, 1624)), min_tokens=4, max_tokens=6,
                            temperature=0.0)
    finished = run(core, [("stops", VICTIM_PROMPT, params)])
    assert finished["stops"].outputs[0].finish_reason == "length"
    # the sampler's per-request cache lives executor-side (engine.step.SequenceState)
    core.add_request("spy", VICTIM_PROMPT, params)
    bans = []
    while core.has_unfinished_requests():
        core.step()
        state = core.executor.states.get("spy")
        if state is not None:
            bans.append(state.sampler_cache.get("min_tokens_ban"))
    assert len(bans) >= 4 and bans[0] is not None
    assert all(b is bans[0] for b in bans)   # built on the first step, reused after
    run(core, [("next", VICTIM_PROMPT, SamplingParams(max_tokens=1))])
    assert core.executor.states.get("spy") is None   # dropped with the next plan


# ------------------------------------------------------------------------------ fairness
def scripted_core(**cfg) -> EngineCore:
    return EngineCore(ScriptedExecutor(lambda r: [7, 8, 9], fallback_token=0),
                      EngineConfig(num_kv_blocks=256, **cfg), model_max_len=4096,
                      eos_token_ids=[0])


def admissions(core: EngineCore) -> list[str]:
    """Step to completion; request ids in the order they were admitted (a step's batch lists
    running requests first, then the ones it admits, in admission order); requests already
    running when called are left out."""
    order: list[str] = []
    already = {r.request_id for r in core.scheduler.running}
    schedule = core.scheduler.schedule

    def spy():
        plan = schedule()
        order.extend(r.request_id for r in plan.requests
                     if r.request_id not in order and r.request_id not in already)
        return plan

    core.scheduler.schedule = spy
    for _ in range(1000):
        if not core.has_unfinished_requests():
            break
        core.step()
    assert not core.has_unfinished_requests()
    return order


def test_flooding_tenant_cannot_starve_another():
    core = scripted_core(max_num_seqs=2)
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    for i in range(20):
        core.add_request(f"A{i}", [1, 2, 3], params, tenant="A")
    core.step()                                   # A0 and A1 take both slots
    assert [r.request_id for r in core.scheduler.running] == ["A0", "A1"]
    for i in range(2):
        core.add_request(f"B{i}", [1, 2, 3], params, tenant="B")
    assert core.num_waiting_for("A") == 18 and core.num_waiting_for("B") == 2
    assert core.waiting_by_tenant() == {"A": 18, "B": 2}
    later = admissions(core)
    # B, new to the queue, is served first; then A and B alternate
    assert later.index("B0") == 0 and later.index("B1") == 2, later
    assert [r for r in later if r.startswith("A")] == [f"A{i}" for i in range(2, 20)]
    assert core.num_waiting_for("A") == 0 and core.waiting_by_tenant() == {}


def test_single_tenant_admission_stays_fifo():
    """Without tenants (or with one) admission is exactly first come, first served."""
    for tenant in (None, "only"):
        core = scripted_core(max_num_seqs=3)
        for i in range(9):
            core.add_request(f"r{i}", [1, 2, 3 + i], SamplingParams(max_tokens=2 + i % 3),
                             tenant=tenant)
        assert admissions(core) == [f"r{i}" for i in range(9)]


def test_round_robin_among_three_flooding_tenants():
    core = scripted_core(max_num_seqs=1)
    for t in "XYZ":
        for i in range(4):
            core.add_request(f"{t}{i}", [1, 2], SamplingParams(max_tokens=1), tenant=t)
    order = admissions(core)
    assert order == [f"{t}{i}" for i in range(4) for t in "XYZ"]


def test_async_engine_per_tenant_queue_limit():
    core = scripted_core()
    eng = AsyncEngine(core, max_queued_per_tenant=2)   # not started: everything stays queued

    async def main():
        gens = [eng.generate(f"A{i}", [1, 2], SamplingParams(), tenant="A") for i in range(2)]
        tasks = [asyncio.ensure_future(g.__anext__()) for g in gens]
        await asyncio.sleep(0)
        assert eng.num_waiting_for("A") == 2 and eng.num_waiting_for("B") == 0
        with pytest.raises(EngineOverloadedError, match="this tenant"):
            await eng.generate("A2", [1, 2], SamplingParams(), tenant="A").__anext__()
        b = eng.generate("B0", [1, 2], SamplingParams(), tenant="B")
        tb = asyncio.ensure_future(b.__anext__())
        await asyncio.sleep(0)
        assert eng.num_waiting_for("B") == 1
        for t in tasks + [tb]:
            t.cancel()
        await asyncio.gather(*tasks, tb, return_exceptions=True)
        for g in gens + [b]:
            await g.aclose()

    asyncio.run(main())
    eng._handle_commands()       # what the engine thread would do: adds then aborts
    assert core.num_waiting == 0 and eng.num_waiting_for("A") == 0
