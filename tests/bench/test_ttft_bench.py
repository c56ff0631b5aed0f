"""benchmarks/ttft.py's own arithmetic (no servers): CPU accounting from /proc and the summary
it prints."""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ttft():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("ttft_bench", ROOT / "benchmarks" / "ttft.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up while built
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task").is_dir(), reason="needs /proc")
def test_cpu_ns_counts_this_process_and_its_main_thread(ttft):
    total0, main0 = ttft.cpu_ns(os.getpid())
    t = time.thread_time()
    while time.thread_time() - t < 0.05:   # 50 ms of work on the main thread
        pass
    total1, main1 = ttft.cpu_ns(os.getpid())
    assert main1 - main0 >= 40e6
    assert total1 - total0 >= main1 - main0
    assert total1 >= main1


def test_summary_percentiles_and_failed_requests(ttft):
    recs = [ttft.Record("ours", i, ok=True, ttft_s=0.010 * (i + 1), itls_s=[0.002, 0.004],
                        prompt_tokens=69, cpu_total_s=0.1 * (i + 1), cpu_main_s=0.01)
            for i in range(3)]
    recs.append(ttft.Record("ours", 3, ok=False, ttft_s=9.0, error="HTTP 500"))
    s = ttft.summarize(recs)
    assert (s["requests"], s["ok"]) == (4, 3)
    assert s["ttft_p50_ms"] == 20.0            # the failed request's 9 s is left out
    assert s["itl_p50_ms"] == 3.0
    assert s["cpu_request_ms"] == 200.0 and s["cpu_main_thread_ms"] == 10.0


def test_rounds_ask_different_questions_of_similar_length(ttft):
    texts = [ttft.messages(i)[0]["content"] for i in range(len(ttft.TOPICS))]
    assert len(set(texts)) == len(texts)
    words = [len(t.split()) for t in texts]
    assert 30 <= min(words) and max(words) <= 45
