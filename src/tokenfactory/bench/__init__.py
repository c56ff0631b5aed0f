"""`tokenfactory bench`: workloads, a load generator, metrics, the host roofline and reports.

    workloads.py   agentic / chat / long-context / reasoning, deterministic from a seed; JSONL traces
    client.py      one streamed Anthropic or OpenAI request, timed per chunk
    targets.py     a URL, our server started for the run (`self`), or the `naive` transformers baseline
    runner.py      closed-loop sessions and open-loop arrivals, bounded in count and time
    metrics.py     percentiles, goodput, cache hit rate, machine-seconds per task, $ per M tokens
    roofline.py    decode / prefill efficiency against the measured host
    report.py      JSON, markdown, PNG plots, `bench compare`
    checkpoint.py  random Llama-shaped checkpoints for benchmarks
"""
