"""Behaviour of the roofline, MoE, prefill, capacity and fleet arithmetic beyond the seed figures."""

import pytest

from tokenfactory.economics import (
    decode_floor, decode_throughput, kv_bytes_for_context, load_hardware, load_model,
    load_workload, max_batch, min_tp_to_fit, param_count, prefill_flops, roofline_step,
    size_fleet, speculative_expected_tokens, step_time_seconds, streamed_weight_bytes,
    weight_bytes,
)
from tokenfactory.economics.analytics import expected_experts_touched


@pytest.fixture(scope="module")
def llama70():
    return load_model("llama-3-70b")


@pytest.fixture(scope="module")
def h100():
    return load_hardware("h100")


def test_weight_bytes_per_precision(llama70):
    bf16 = weight_bytes(llama70, "bf16")
    assert weight_bytes(llama70, "fp8") == bf16 / 2
    assert weight_bytes(llama70, "fp4") == bf16 / 4
    assert weight_bytes(llama70, "fp32") == bf16 * 2
    with pytest.raises(ValueError, match="unknown precision"):
        weight_bytes(llama70, "fp7")


def test_decode_streams_weights_but_not_the_input_embedding(llama70):
    p = param_count(llama70)
    assert streamed_weight_bytes(llama70, 1) == (p.total - p.embedding) * 2


def test_roofline_switches_to_compute_bound_past_the_ridge(llama70, h100):
    assert decode_floor(llama70, h100, batch=1).bound == "memory"
    big = decode_floor(llama70, h100, batch=512)
    assert big.bound == "compute"
    assert big.seconds == big.compute_seconds > big.memory_seconds
    prefill = roofline_step(llama70, h100, [4096], [0])
    assert prefill.bound == "compute"
    assert prefill.arithmetic_intensity > 295


def test_kv_reads_grow_the_decode_step(llama70, h100):
    short = decode_floor(llama70, h100, batch=64, context=0)
    long = decode_floor(llama70, h100, batch=64, context=4096)
    extra = long.bytes_moved - short.bytes_moved
    assert extra == pytest.approx(64 * kv_bytes_for_context(llama70, 4096), rel=0.01)


def test_tensor_parallel_divides_time_not_cost(llama70, h100):
    one = decode_floor(llama70, h100, batch=8, tp=1)
    two = decode_floor(llama70, h100, batch=8, tp=2)
    assert two.seconds == pytest.approx(one.seconds / 2)


def test_prefill_flops_have_a_quadratic_attention_term(llama70):
    linear_per_token = prefill_flops(llama70, 2) - prefill_flops(llama70, 1)
    f1k, f2k = prefill_flops(llama70, 1024), prefill_flops(llama70, 2048)
    assert f2k > 2 * f1k - 2 * llama70.vocab_size * llama70.hidden_size
    attention_2k = 4 * 64 * 128 * 80 * (2048 * 2049 / 2)
    assert f2k - 2048 * 2 * (param_count(llama70).total - 2 * 128256 * 8192) \
        - 2 * 128256 * 8192 == pytest.approx(attention_2k, rel=1e-9)
    # a cached prefix shortens the work but new tokens still attend to it
    assert prefill_flops(llama70, 100, cached_tokens=10_000) > prefill_flops(llama70, 100)
    assert linear_per_token > 0


def test_sliding_window_bounds_attention_flops():
    oss = load_model("gpt-oss-120b")
    mistral = load_model("mistral-7b")
    # past the window, each extra token costs the same in a fully windowed model
    d1 = prefill_flops(mistral, 10_001) - prefill_flops(mistral, 10_000)
    d2 = prefill_flops(mistral, 20_001) - prefill_flops(mistral, 20_000)
    assert d1 == pytest.approx(d2)
    assert prefill_flops(oss, 8192) > 0


def test_moe_reads_more_experts_as_the_batch_grows():
    ds = load_model("deepseek-v3")
    assert expected_experts_touched(256, 8, 1) == pytest.approx(8)
    assert expected_experts_touched(256, 8, 4096) == pytest.approx(256, rel=1e-6)
    one = streamed_weight_bytes(ds, 1, "fp8")
    many = streamed_weight_bytes(ds, 4096, "fp8")
    assert one == pytest.approx((param_count(ds).active - param_count(ds).embedding), rel=1e-6)
    assert many == pytest.approx(weight_bytes(ds, "fp8") - param_count(ds).embedding, rel=1e-3)


def test_max_batch_and_tensor_parallel(llama70, h100):
    assert max_batch(llama70, h100, 4096, tp=1) == 0              # 141 GB > 80 GB
    assert min_tp_to_fit(llama70, h100, 4096) == 2
    fp8 = max_batch(llama70, h100, 4096, tp=2, kv_dtype="fp8")
    assert fp8 >= 2 * max_batch(llama70, h100, 4096, tp=2)       # halving KV doubles batch
    with pytest.raises(ValueError):
        max_batch(llama70, h100, 0)
    # MLA's latent is replicated on every tensor-parallel rank
    ds, b200 = load_model("deepseek-v3"), load_hardware("b200")
    assert max_batch(ds, b200, 4096, tp=8, precision="fp8") < \
        (8 * b200.memory_bytes - weight_bytes(ds, "fp8")) // kv_bytes_for_context(ds, 4096, "fp8")


def test_step_time_for_a_simulated_executor(llama70, h100):
    mixed = step_time_seconds(llama70, h100, batch_tokens=[1, 1, 512], contexts=[900, 50, 0],
                              tp=2)
    decode_only = step_time_seconds(llama70, h100, [1, 1], [900, 50], tp=2)
    assert mixed > decode_only > 0
    assert step_time_seconds(llama70, h100, [0, 0], [10, 10]) == 0.0
    with pytest.raises(ValueError):
        step_time_seconds(llama70, h100, [1], [1, 2])
    with pytest.raises(ValueError):
        step_time_seconds(llama70, h100, [-1], [0])


def test_throughput_per_gpu_rack_and_megawatt(llama70):
    gb200 = load_hardware("gb200")
    t = decode_throughput(llama70, gb200, batch=64, context=2048, tp=1, pue=1.0)
    assert t.tokens_per_s_per_rack == pytest.approx(72 * t.tokens_per_s_per_gpu)
    assert t.watts_per_gpu == pytest.approx(120_000 / 72)
    assert t.tokens_per_s_per_mw == pytest.approx(t.tokens_per_s_per_gpu / t.watts_per_gpu * 1e6)


def test_fleet_sizing_scales_with_demand(llama70, h100):
    chat = load_workload("chat")
    small = size_fleet(llama70, h100, 1e9, chat, tp=2)
    large = size_fleet(llama70, h100, 1e11, chat, tp=2)
    assert small.gpus % 2 == 0 and large.gpus % 2 == 0
    assert large.gpus > 50 * small.gpus
    assert large.facility_megawatts == pytest.approx(large.it_megawatts * 1.2)
    assert large.capex_usd == large.gpus * h100.capex_usd
    assert large.rental_usd_per_year == pytest.approx(large.gpus * 2.5 * 8760)
    # caching skips prefill: the agentic shape with 0% hits needs more machines
    agentic = load_workload("agentic")
    cold = type(agentic)(**{**agentic.__dict__, "cache_hit_rate": 0.0})
    warm_plan = size_fleet(llama70, h100, 1e11, agentic, tp=4)
    cold_plan = size_fleet(llama70, h100, 1e11, cold, tp=4)
    assert cold_plan.prefill_gpu_seconds_per_request > \
        5 * warm_plan.prefill_gpu_seconds_per_request
    assert cold_plan.gpus > warm_plan.gpus
    with pytest.raises(ValueError, match="does not fit"):
        size_fleet(llama70, h100, 1e9, chat, tp=1)
    with pytest.raises(ValueError):
        load_workload("nonsense")


def test_speculative_limits():
    assert speculative_expected_tokens(1.0, 5) == 6
    assert speculative_expected_tokens(0.0, 5) == 1
    with pytest.raises(ValueError):
        speculative_expected_tokens(1.5, 5)
