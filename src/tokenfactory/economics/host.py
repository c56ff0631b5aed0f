"""Measure this machine's roofline: memory bandwidth and matmul throughput.

``measure_host()`` is the one routine both ``tokenfactory plan --hardware host`` and the
benchmarks use, so "distance to the floor" always means the same floor. numpy and torch are
imported lazily inside it: the rest of the economics package imports without either.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional


@dataclass(frozen=True)
class HostMeasurement:
    bandwidth_bytes_per_s: float     # best of multi-threaded copy and add, STREAM byte counting
                                     # (details["read_bytes_per_s"]: a read-only stream)
    fp32_flops: float                # square matmul, FLOP/s
    bf16_flops: Optional[float]      # None when torch (or bf16 matmul) is unavailable
    memory_bytes: int                # physical RAM
    threads: int
    seconds: float                   # wall time the measurement took
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def _best_parallel(jobs: list[Callable[[], object]], seconds: float) -> float:
    """Run every job on a thread of its own, all released together, round after round (at
    least 3, at most 200, until ``seconds`` pass); the best round's wall time, from the first
    start to the last end. Each worker stamps its own times: the main thread may wake up late
    from the barrier, after the workers (numpy runs without the GIL) already finished."""
    count = len(jobs)
    barrier = threading.Barrier(count + 1)
    starts, ends, stop = [0.0] * count, [0.0] * count, [False]

    def worker(index: int) -> None:
        while True:
            barrier.wait()
            if stop[0]:
                return
            starts[index] = time.perf_counter()
            jobs[index]()
            ends[index] = time.perf_counter()
            barrier.wait()

    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(count)]
    for t in pool:
        t.start()
    best, rounds, deadline = float("inf"), 0, time.perf_counter() + seconds
    while rounds < 3 or (time.perf_counter() < deadline and rounds < 200):
        barrier.wait()                       # release the workers
        barrier.wait()                       # all done
        best = min(best, max(ends) - min(starts))
        rounds += 1
    stop[0] = True
    barrier.wait()
    for t in pool:
        t.join()
    return best


def _bandwidth(seconds: float, threads: int, array_bytes: int) -> tuple[float, dict]:
    """STREAM-style copy (a = b: 2 bytes moved per byte) and add (a = b + c: 3), each thread
    on its own slice so every core pulls on memory; best round wins. Also a read-only stream
    (max over b: 1 byte per byte), the traffic of a decode step, which reads weights and
    writes almost nothing: on this Zen 4 guest copy/add report up to ~70 GB/s where a read
    alone reaches ~62 (reads and writes travel separate links), so a read-bound kernel's floor
    is bytes / read bandwidth."""
    import numpy as np

    n = array_bytes // 8
    a, b, c = np.zeros(n), np.ones(n), np.full(n, 2.0)     # touch every page up front
    bounds = [(i * n // threads, (i + 1) * n // threads) for i in range(threads)]
    kernels = {
        "copy": lambda lo, hi: np.copyto(a[lo:hi], b[lo:hi]),
        "add": lambda lo, hi: np.add(b[lo:hi], c[lo:hi], out=a[lo:hi]),
        "read": lambda lo, hi: b[lo:hi].max(),
    }
    best = {name: _best_parallel([lambda f=f, lo=lo, hi=hi: f(lo, hi) for lo, hi in bounds],
                                 seconds / 3.0)
            for name, f in kernels.items()}
    copy_s, add_s, read_s = best["copy"], best["add"], best["read"]
    copy_bw = 2 * n * 8 / copy_s
    add_bw = 3 * n * 8 / add_s
    return max(copy_bw, add_bw), {"copy_bytes_per_s": copy_bw, "add_bytes_per_s": add_bw,
                                  "read_bytes_per_s": n * 8 / read_s, "array_bytes": n * 8}


def measure_bandwidth(seconds: float = 1.6, threads: Optional[int] = None,
                      array_bytes: int = 256 * 2 ** 20) -> tuple[float, dict]:
    """Memory bandwidth alone (bytes/s, details), as :func:`measure_host` measures it: for
    benchmarks that repeat it between their own runs, since on a shared host it drifts by tens
    of percent within minutes. numpy advises its large arrays for transparent huge pages, so
    this is the huge-page bandwidth (the model's weights and KV pages live on huge pages too,
    see tokenfactory.model.hugepages)."""
    return _bandwidth(seconds, threads or os.cpu_count() or 1, array_bytes)


def read_seconds(buffers: list, seconds: float = 1.0, threads: Optional[int] = None) -> float:
    """Best time to read every byte of ``buffers`` (numpy arrays, e.g. views of a model's
    weights) once, each thread a slice of each buffer, all threads at once: the floor of a
    step that has to stream exactly these bytes from wherever they live. (On a VM the same
    host can read one allocation ~35 GB/s and another ~60: fresh arrays measure the host,
    this measures the memory a model actually got.)"""
    threads = threads or os.cpu_count() or 1
    slices = [[buf[i * len(buf) // threads:(i + 1) * len(buf) // threads] for buf in buffers]
              for i in range(threads)]
    return _best_parallel([lambda parts=parts: [p.max() for p in parts if len(p)]
                           for parts in slices], seconds)


def _best_matmul(matmul, a, b, flops: float, seconds: float) -> float:
    matmul(a, b)                                  # warm up (thread pools, packing)
    deadline = time.perf_counter() + seconds
    best = float("inf")
    runs = 0
    while runs < 2 or time.perf_counter() < deadline:
        start = time.perf_counter()
        matmul(a, b)
        best = min(best, time.perf_counter() - start)
        runs += 1
        if runs >= 100:
            break
    return flops / best


def _matmul(seconds: float, size: int) -> tuple[float, Optional[float], dict]:
    flops = 2.0 * size ** 3
    try:
        import torch
    except ImportError:
        torch = None
    if torch is None:
        import numpy as np
        a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
        fp32 = _best_matmul(np.matmul, a, a, flops, seconds / 2)
        return fp32, None, {"matmul_library": "numpy", "matmul_size": size,
                            "bf16": "unavailable: torch not installed"}
    with torch.inference_mode():
        a32 = torch.randn(size, size, dtype=torch.float32)
        fp32 = _best_matmul(torch.matmul, a32, a32, flops, seconds / 2)
        bf16: Optional[float]
        try:
            a16 = a32.to(torch.bfloat16)
            bf16 = _best_matmul(torch.matmul, a16, a16, flops, seconds / 2)
        except RuntimeError as exc:               # no bf16 GEMM on this build
            bf16 = None
            return fp32, bf16, {"matmul_library": "torch", "bf16": f"unavailable: {exc}"}
    return fp32, bf16, {"matmul_library": f"torch {torch.__version__}",
                        "matmul_size": size, "torch_threads": torch.get_num_threads()}


def measure_host(seconds_budget: float = 4.0, threads: Optional[int] = None,
                 array_bytes: int = 256 * 2 ** 20, matmul_size: int = 2048) -> HostMeasurement:
    """Measure bandwidth (about 40% of the budget) and fp32/bf16 matmul (the rest).

    ``array_bytes`` per array should exceed the last-level cache several times over, or the
    copy measures cache rather than DRAM bandwidth: with 64 MiB arrays this 2-core Zen 4 host
    reported ~70 GB/s (cache-assisted) against ~16-35 GB/s with 256+ MiB arrays."""
    if seconds_budget <= 0:
        raise ValueError("seconds_budget must be positive")
    started = time.perf_counter()
    threads = threads or os.cpu_count() or 1
    bandwidth, bw_details = _bandwidth(seconds_budget * 0.4, threads, array_bytes)
    fp32, bf16, mm_details = _matmul(seconds_budget * 0.4, matmul_size)
    return HostMeasurement(
        bandwidth_bytes_per_s=bandwidth, fp32_flops=fp32, bf16_flops=bf16,
        memory_bytes=_physical_memory(), threads=threads,
        seconds=time.perf_counter() - started, details={**bw_details, **mm_details})
