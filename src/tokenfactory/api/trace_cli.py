"""``tokenfactory trace ID --url URL [--api-key K]``: one request's journey, station by station.

Fetches ``GET /v1/trace/{ID}`` (api/trace.py) and prints a table like the seed's request trace:
station, start offset, duration, tokens, bytes and share of the end-to-end time (each
station's ``self_s``: the part of the total only it accounts for), then the cost split.
"""
from __future__ import annotations

import argparse
import json
import sys

INDENT = {"prefill_chunk": "  "}


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f} ms"


def _num(n) -> str:
    return "-" if n is None else f"{n:,}"


def _usd(x) -> str:
    return "-" if x is None else f"${x:.8f}"


def format_trace(doc: dict) -> str:
    """The trace JSON as a text table plus the cost split."""
    total = doc.get("duration_s") or 0.0
    lines = [f"request {doc.get('request_id')}  ({doc.get('response_id')}, {doc.get('route')}, "
             f"{'stream' if doc.get('stream') else 'non-stream'}, status {doc.get('status')})",
             f"prompt {_num(doc.get('prompt_tokens'))} tokens ({_num(doc.get('cached_tokens'))} "
             f"cached), output {_num(doc.get('output_tokens'))} tokens, finish "
             f"{doc.get('finish_reason')}, end to end {_ms(total)}", ""]
    header = (f"{'station':<18} {'start':>11} {'duration':>11} {'tokens':>8} {'bytes':>9} "
              f"{'share':>7}")
    lines += [header, "-" * len(header)]
    for s in doc.get("spans", []):
        if s["name"] == "request":
            continue
        share = ("" if s.get("self_s") is None or not total
                 else f"{100.0 * s['self_s'] / total:6.1f}%")
        extra = ""
        a = s.get("attributes", {})
        if s["name"] == "decode" and a.get("steps") is not None:
            extra = f"  {a['steps']} steps"
        elif s["name"] == "prefix_lookup":
            extra = f"  tier {a.get('tier')}"
        elif s["name"] == "route":
            extra = f"  replica {a.get('replica')} of {a.get('replicas')}"
        elif s["name"] == "detokenize" and a.get("calls") is not None:
            extra = f"  {a['calls']} calls"
        name = INDENT.get(s["name"], "") + s["name"]
        lines.append(f"{name:<18} {_ms(s.get('start_s')):>11} {_ms(s.get('duration_s')):>11} "
                     f"{_num(s.get('tokens')):>8} {_num(s.get('bytes')):>9} {share:>7}{extra}")
    selfs = sum(s["self_s"] or 0.0 for s in doc.get("spans", []) if s.get("self_s") is not None)
    lines.append("-" * len(header))
    lines.append(f"{'total':<18} {'':>11} {_ms(total):>11} {'':>8} {'':>9} "
                 f"{(100.0 * selfs / total if total else 0.0):6.1f}%")
    cost = doc.get("cost")
    if cost:
        lines += ["", f"cost (machine time at ${cost.get('cost_per_hour', 0):.2f}/h):",
                  f"  prefill        {cost['prefill_machine_seconds'] * 1e3:10.3f} ms  "
                  f"{_usd(cost['prefill_usd'])}",
                  f"  decode         {cost['decode_machine_seconds'] * 1e3:10.3f} ms  "
                  f"{_usd(cost['decode_usd'])}"]
        if cost.get("machine_seconds") is not None:
            lines.append(f"  total          {cost['machine_seconds'] * 1e3:10.3f} ms  "
                         f"{_usd(cost['usd'])}  ({cost['joules']:.3f} J; API price "
                         f"{_usd(cost['api_usd'])})")
        lines.append(f"  cache savings  {_num(cost['cache_saved_tokens'])} prompt tokens not "
                     f"recomputed"
                     + (f"; {_num(cost.get('cache_read_tokens'))} billed as cache reads, "
                        f"{_usd(cost['cache_saved_api_usd'])} off at API prices"
                        if cost.get("cache_saved_api_usd") is not None else ""))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="tokenfactory trace",
                                description="Print one request's station trace from a server.")
    p.add_argument("request_id", metavar="ID",
                   help="the request-id response header (or the response's msg_/chatcmpl- id)")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    p.add_argument("--api-key", default=None,
                   help="an API key (its tenant's traces) or the metrics key (every trace)")
    p.add_argument("--json", action="store_true", help="print the raw trace JSON")
    args = p.parse_args(argv)

    import httpx
    headers = {"x-api-key": args.api_key} if args.api_key else {}
    url = f"{args.url.rstrip('/')}/v1/trace/{args.request_id}"
    try:
        resp = httpx.get(url, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    if resp.status_code != 200:
        try:
            err = resp.json().get("error", {})
            msg = err.get("message") if isinstance(err, dict) else str(err)
        except ValueError:
            msg = resp.text[:200]
        print(f"error: {resp.status_code}: {msg}", file=sys.stderr)
        return 1
    doc = resp.json()
    print(json.dumps(doc, indent=2) if args.json else format_trace(doc))
    return 0
