"""Smoke test of the host roofline measurement (the one routine benchmarks also call)."""

import pytest

from tokenfactory.economics import load_model, max_batch
from tokenfactory.economics.host import HostMeasurement, measure_host


def test_measure_host_reports_bandwidth_and_matmul_throughput():
    import torch  # noqa: F401 - a test dependency; bf16 matmul is measured with it
    m = measure_host(seconds_budget=1.0, array_bytes=32 * 2 ** 20, matmul_size=512)
    assert isinstance(m, HostMeasurement)
    assert 1e9 < m.bandwidth_bytes_per_s < 1e13        # GB/s .. 10 TB/s: sane for any host
    assert m.fp32_flops > 1e9
    assert m.bf16_flops is not None and m.bf16_flops > 1e9
    assert m.memory_bytes > 0 and m.threads >= 1
    assert m.seconds < 10


def test_host_hardware_entry_uses_the_measurement(monkeypatch):
    from tokenfactory.economics import catalog

    fake = HostMeasurement(bandwidth_bytes_per_s=35e9, fp32_flops=198e9, bf16_flops=430e9,
                           memory_bytes=24 * 2 ** 30, threads=2, seconds=0.0)
    monkeypatch.setattr(catalog, "_measured_host", lambda budget: fake)
    host = catalog.load_hardware("host")
    assert host.measured and host.bandwidth_bytes_per_s == 35e9
    assert host.peak_flops("bf16") == 430e9
    assert max_batch(load_model("llama-3-8b"), host, 4096) > 0


def test_measure_host_rejects_a_zero_budget():
    with pytest.raises(ValueError):
        measure_host(seconds_budget=0)
