import math

import pytest

from tokenfactory.bench.client import RequestRecord
from tokenfactory.bench.metrics import percentile, summarize
from tokenfactory.bench.roofline import _normalize, efficiency


def rec(session, turn, send, chunks, prompt, cached, ok=True):
    r = RequestRecord(session=session, turn=turn, t_send=send)
    if ok:
        r.t_first, r.t_end, r.chunk_times = chunks[0], chunks[-1], list(chunks)
        r.prompt_tokens, r.cached_tokens, r.output_tokens, r.ok = prompt, cached, len(chunks), True
    else:
        r.error = "HTTP 500: boom"
    return r


def test_percentile_linear_interpolation():
    v = [4.0, 1.0, 3.0, 2.0]           # sorted 1 2 3 4; rank = p/100 * 3
    assert percentile(v, 50) == pytest.approx(2.5)
    assert percentile(v, 90) == pytest.approx(3.7)
    assert percentile(v, 99) == pytest.approx(3.97)
    assert percentile(v, 0) == 1.0 and percentile(v, 100) == 4.0
    assert percentile([5.0], 99) == 5.0 and percentile([], 50) is None


def timeline():
    # session a: 2 turns; session b: turn 0 ok, turn 1 failed; session c: never ran turn 1
    return [
        rec("a", 0, 0.0, [1.0, 1.5, 2.0], prompt=100, cached=0),     # ttft 1.0, itl .5 .5
        rec("a", 1, 2.0, [2.5, 2.6, 2.7], prompt=200, cached=150),   # ttft 0.5, itl .1 .1
        rec("b", 0, 0.0, [2.0, 3.0], prompt=100, cached=90),         # ttft 2.0, itl 1.0
        rec("b", 1, 3.0, [], prompt=0, cached=0, ok=False),
        rec("c", 0, 1.0, [1.2, 1.4, 1.6, 4.0], prompt=100, cached=60),  # ttft .2, itl .2 .2 2.4
    ]


def test_summary_on_a_synthetic_timeline():
    m = summarize(timeline(), duration=4.0, tasks={"a": 2, "b": 2, "c": 2}, slo_ttft=1.0, slo_itl=0.5,
                  cost_per_hour=3.6)
    assert m["requests"] == 5 and m["completed_requests"] == 4 and m["failed_requests"] == 1
    assert m["errors"] == ["HTTP 500: boom"]
    assert m["tasks"] == 3 and m["completed_tasks"] == 1                # only a finished every turn
    # TTFTs sorted .2 .5 1 2 -> p50 = .75, p90 = rank 2.7 -> 1 + .7 * 1 = 1.7
    assert m["ttft_p50_s"] == pytest.approx(0.75)
    assert m["ttft_p90_s"] == pytest.approx(1.7)
    assert m["ttft_p99_s"] == pytest.approx(1.97)
    # ITLs .5 .5 .1 .1 1.0 .2 .2 2.4 -> sorted .1 .1 .2 .2 .5 .5 1 2.4; p50 = rank 3.5 -> .35
    assert m["itl_p50_s"] == pytest.approx(0.35)
    assert m["itl_p99_s"] == pytest.approx(1.0 + 0.93 * 1.4)
    # E2E 2.0 .7 3.0 3.0 -> sorted .7 2 3 3 -> p50 2.5
    assert m["e2e_p50_s"] == pytest.approx(2.5)
    assert m["output_tokens"] == 12
    assert m["output_throughput_tps"] == pytest.approx(3.0)
    assert m["request_throughput_rps"] == pytest.approx(1.0)
    # hit rate from usage: (0 + 150 + 90 + 60) / (100 + 200 + 100 + 100)
    assert m["prefix_cache_hit_rate"] == pytest.approx(300 / 500)
    # goodput: TTFT <= 1 and TPOT <= .5: a0 (tpot .5) yes, a1 (tpot .1) yes, b0 (ttft 2) no,
    # c0 (tpot (4 - 1.2)/3 = .933) no -> 2 requests in 4 s
    assert m["goodput_rps"] == pytest.approx(0.5)
    assert m["goodput_fraction"] == pytest.approx(2 / 5)
    assert m["machine_seconds"] == 4.0 and m["machine_seconds_per_task"] == pytest.approx(4.0)
    # $3.6/h for 4 s = $0.004 -> per M output tokens: 0.004 / 12 * 1e6
    assert m["dollars"] == pytest.approx(0.004)
    assert m["dollars_per_m_output_tokens"] == pytest.approx(0.004 / 12 * 1e6)
    assert m["dollars_per_m_total_tokens"] == pytest.approx(0.004 / 512 * 1e6)


def test_no_slo_means_every_success_counts_and_no_tasks_means_no_cost_per_task():
    recs = timeline()
    m = summarize(recs, duration=2.0, tasks={"b": 2})
    assert m["goodput_rps"] == pytest.approx(4 / 2.0)
    assert m["completed_tasks"] == 0 and m["machine_seconds_per_task"] is None
    assert "dollars" not in m


def test_efficiency_estimates():
    shape = {"params": 1000, "params_layers": 800, "params_no_embed": 900, "dtype": "float32",
             "bytes_per_param": 4, "num_layers": 2, "hidden_size": 8, "attn_dim": 8, "kv_bytes_per_token": 64}
    r = rec("a", 0, 0.0, [1.0, 2.0, 3.0], prompt=100, cached=0)
    metrics = {"tpot_p50_s": 1.0, "output_throughput_tps": 2.0}
    host = {"memory_bandwidth_bytes_s": 1e4, "fp32_flops": 1e6}
    eff = efficiency([r], metrics, shape, host, min_uncached=10)
    # decode: 4000 B of weights per 1 s step + 2 tok/s x mean context (100 + 3/2) x 64 B
    assert eff["decode_bytes_per_s"] == pytest.approx(4000 + 2.0 * 101.5 * 64)
    assert eff["decode_efficiency"] == pytest.approx(eff["decode_bytes_per_s"] / 1e4)
    # prefill: 2 x 800 x 100 + 4 x 2 x 8 x 100 x 50 FLOPs in a 1 s TTFT
    assert eff["prefill_flops_per_s"] == pytest.approx(160000 + 320000)
    assert eff["prefill_efficiency"] == pytest.approx(0.48)


def test_host_numbers_are_found_in_either_unit():
    assert _normalize({"bandwidth_bytes_per_s": 5e10, "fp32_flops": 1e11, "bf16_flops": 2e11}) == {
        "memory_bandwidth_bytes_s": 5e10, "fp32_flops": 1e11, "bf16_flops": 2e11}
    n = _normalize({"mem_bandwidth_gb_s": 50.0, "fp32_gflops": 100.0})
    assert n["memory_bandwidth_bytes_s"] == pytest.approx(5e10) and n["fp32_flops"] == pytest.approx(1e11)
