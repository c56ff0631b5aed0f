"""Replicas on this machine (issue 17): the agentic workload of `tokenfactory bench` against
`tokenfactory serve` in several replica layouts, interleaved, with the server's own /metrics.

Each run starts `tokenfactory serve <layout args>` on a free loopback port, drives it with
`tokenfactory bench --target <its URL>` (the same load generator and report as every other
serving benchmark), then reads /metrics before stopping it: per-replica requests and hit rates
(`tokenfactory_replica_*`), forward-pass seconds charged to requests (the cost ledger), and
in the disaggregated layout the KV transfer counters (`tokenfactory_kv_transfer_*`).

Layouts (`--layouts`, default all, in this order within every round):

    one       --replicas 1                     one replica on Ray, both cores
    prefix    --replicas 2 --router prefix     two replicas, one core each
    rr        --replicas 2 --router round-robin
    pd        --prefill-replicas 1 --decode-replicas 1

    .venv/bin/python benchmarks/router_bench.py [--rounds 2] [--layouts one,prefix,rr,pd]
        [--sessions 4 --turns 4 --prefix-tokens 1024] [--json out.json]

The same thing by hand for one layout (bench starts and stops the server itself):

    tokenfactory bench --workload agentic --target self --model <gguf> \
        --server-arg=--replicas=2 --server-arg=--router=prefix

Wall-clock figures (machine-s/task, TTFT, ITL) depend on the host: on a shared host, say so.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

LAYOUTS = {
    "one": ["--replicas", "1"],
    "prefix": ["--replicas", "2", "--router", "prefix"],
    "rr": ["--replicas", "2", "--router", "round-robin"],
    "pd": ["--prefill-replicas", "1", "--decode-replicas", "1"],
}


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> dict[str, dict[str, float]]:
    """{family: {replica label or "": value}} from the server's /metrics."""
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in family.samples:
            if s.name in (family.name, family.name + "_total"):
                out.setdefault(family.name, {})[s.labels.get("replica", "")] = s.value
    return out


def run_layout(name: str, args, workdir: Path, round_no: int) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / f"serve-{name}-{round_no}.log"
    cmd = [sys.executable, "-m", "tokenfactory.cli", "serve", "--host", "127.0.0.1", "--port",
           str(port), *(["--model", args.model] if args.model else []), *LAYOUTS[name]]
    with open(log_path, "wb") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"serve {name} did not come up; see {log_path}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        before = scrape(url)
        out_json = workdir / f"bench-{name}-{round_no}.json"
        bench = [sys.executable, "-m", "tokenfactory.cli", "bench", "--target", url,
                 "--model-name", args.model_name, "--workload", "agentic",
                 "--sessions", str(args.sessions), "--turns", str(args.turns),
                 "--prefix-tokens", str(args.prefix_tokens), "--tool-min", str(args.tool_min),
                 "--tool-max", str(args.tool_max), "--output-tokens", str(args.output_tokens),
                 "--think-time", str(args.think_time), "--seed", str(args.seed),
                 "--no-roofline", "--no-progress", "--json", str(out_json)]
        subprocess.run(bench, check=True, stdout=subprocess.DEVNULL)
        after = scrape(url)
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    run = json.loads(out_json.read_text())["runs"][0]
    return summarize_run(name, round_no, run["metrics"], before, after)


def summarize_run(name: str, round_no: int, m: dict, before: dict, after: dict) -> dict:
    def delta(family: str, label: str = "") -> float:
        return after.get(family, {}).get(label, 0.0) - before.get(family, {}).get(label, 0.0)

    replicas = sorted(after.get("tokenfactory_replica_requests_routed", {}))
    per_replica = {
        r: {"routed": delta("tokenfactory_replica_requests_routed", r),
            "hit_rate": (delta("tokenfactory_replica_prefix_cache_hits", r)
                         / max(1.0, delta("tokenfactory_replica_prefix_cache_queries", r)))}
        for r in replicas}
    tasks = m["completed_tasks"] or float("nan")
    row = {"layout": name, "round": round_no, "requests_ok": m["completed_requests"],
           "requests": m["requests"], "hit_rate": m["prefix_cache_hit_rate"],
           "machine_s_per_task": m["machine_seconds_per_task"],
           "forward_s_per_task": delta("tokenfactory_machine_seconds") / tasks,
           "ttft_p50_s": m["ttft_p50_s"], "ttft_p90_s": m["ttft_p90_s"],
           "itl_p50_s": m["itl_p50_s"], "e2e_p50_s": m["e2e_p50_s"], "replicas": per_replica}
    moved = delta("tokenfactory_kv_transfer_tokens")
    if moved:
        row["kv_transfer"] = {
            "transfers": delta("tokenfactory_kv_transfers"), "tokens": moved,
            "export_us_per_token": 1e6 * delta("tokenfactory_kv_transfer_export_seconds") / moved,
            "hop_us_per_token": 1e6 * delta("tokenfactory_kv_transfer_seconds") / moved}
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| layout | round | ok | hit rate | machine-s/task | forward-s/task | TTFT p50 s | "
             "ITL p50 ms | E2E p50 s | per replica: routed (hit rate) | KV transfer us/token "
             "(export + hop) |", "|" + "---|" * 11]
    for r in rows:
        reps = ", ".join(f"{v['routed']:.0f} ({v['hit_rate']:.0%})" for v in r["replicas"].values())
        kv = r.get("kv_transfer")
        kv_s = (f"{kv['export_us_per_token']:.0f} + {kv['hop_us_per_token']:.0f} "
                f"({kv['tokens']:.0f} tok)" if kv else "")
        lines.append(f"| {r['layout']} | {r['round']} | {r['requests_ok']}/{r['requests']} | "
                     f"{r['hit_rate']:.1%} | {r['machine_s_per_task'] or float('nan'):.1f} | "
                     f"{r['forward_s_per_task']:.1f} | {r['ttft_p50_s']:.2f} | "
                     f"{1e3 * r['itl_p50_s']:.0f} | {r['e2e_p50_s']:.1f} | {reps} | {kv_s} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--model", default=None, help="default: serve's default model (SmolLM2)")
    p.add_argument("--model-name", default="smollm2")
    p.add_argument("--sessions", type=int, default=4)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--prefix-tokens", type=int, default=1024)
    p.add_argument("--tool-min", type=int, default=100)
    p.add_argument("--tool-max", type=int, default=300)
    p.add_argument("--output-tokens", type=int, default=16)
    p.add_argument("--think-time", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    unknown = [x for x in layouts if x not in LAYOUTS]
    if unknown:
        p.error(f"unknown layout(s) {unknown}; choose from {', '.join(LAYOUTS)}")
    workdir = Path(tempfile.mkdtemp(prefix="tokenfactory-router-bench-"))
    rows = []
    for round_no in range(args.rounds):
        for name in layouts:
            t0 = time.monotonic()
            rows.append(run_layout(name, args, workdir, round_no))
            print(f"[router_bench] {name} round {round_no}: hit {rows[-1]['hit_rate']:.1%}, "
                  f"{time.monotonic() - t0:.0f} s", file=sys.stderr)
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": argv or sys.argv[1:], "load_avg":
                                               os.getloadavg(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
