"""The fleet simulation (small): real engines on the simulated executor, routed by each policy.
The 64-replica, 1,000-session run is benchmarks/router_sim.py."""
from __future__ import annotations

import logging

import pytest

from tokenfactory.router.simulate import (SimConfig, agentic_trace, simulate, text_to_ids,
                                          trace_hit_ceiling)


@pytest.fixture(scope="module")
def results():
    trace = agentic_trace(48, groups=3, turns=6, prefix_tokens=128, tool_min=50, tool_max=300,
                          output_tokens=8, arrival_rate=20.0)
    logging.disable(logging.WARNING)
    try:
        out = {p: simulate(trace, SimConfig(num_replicas=6, policy=p, num_kv_blocks=2048))
               for p in ("prefix", "round-robin", "least-loaded")}
    finally:
        logging.disable(logging.NOTSET)
    return trace, out


def test_every_request_finishes_and_no_page_leaks(results):
    trace, out = results
    n = sum(len(s.turns) for s in trace)
    for r in out.values():
        assert r.num_requests == n and sum(r.requests_per_replica) == n
        assert r.leaked_pages == 0
        assert r.cached_tokens <= r.prompt_tokens


def test_prefix_routing_beats_round_robin_near_the_ceiling(results):
    trace, out = results
    ceiling = trace_hit_ceiling(trace)
    prefix, rr = out["prefix"], out["round-robin"]
    assert prefix.hit_rate <= ceiling + 1e-9
    # what is lost: first turns placed for balance on a replica without their system prompt
    assert prefix.hit_rate >= ceiling - 0.1, (prefix.hit_rate, ceiling)
    assert rr.hit_rate < prefix.hit_rate - 0.1, (rr.hit_rate, prefix.hit_rate)
    assert rr.imbalance == pytest.approx(1.0, abs=0.05)
    assert prefix.imbalance <= 1.25, prefix.requests_per_replica
    assert out["least-loaded"].imbalance <= 1.25, out["least-loaded"].requests_per_replica


def test_trace_prompts_extend_turn_by_turn():
    trace = agentic_trace(4, groups=2, turns=3, prefix_tokens=256, tool_min=20, tool_max=40)
    assert len(trace) == 4 and all(len(s.turns) == 3 for s in trace)
    assert [s.arrival for s in trace] == sorted(s.arrival for s in trace)
    assert text_to_ids("a b, a") == text_to_ids("a b, a") and len(text_to_ids("a b, a")) == 4
    # sessions of one agent share their system prompt; the two agents differ
    firsts = {tuple(s.turns[0].new_ids[:s.shared_len]) for s in trace}
    assert len(firsts) == 2
