"""lm-evaluation-harness against our server, compared item by item with its own ``hf`` backend.

    .venv/bin/python benchmarks/lm_eval/run.py [--limit N] [--num-concurrent 4]
        [--prompts auto|tokens|text] [--json out.json]

Both backends score the same 50-question task (tokenfactory_mc.yaml + tokenfactory_mc.jsonl,
written for this repository) on the same weights, the SmolLM2-135M-Instruct Q4_1 GGUF file the
server serves by default, dequantized to float32 on both sides, and the same tokenizer (the
GGUF's, exported once by transformers and handed to both lm-eval models):

- ``local-completions``: lm-eval's own OpenAI-completions client, unmodified, against
  ``tokenfactory serve --dtype float32`` started here on a free port. It scores each choice by
  ``/v1/completions`` with ``echo: true, logprobs: 1, max_tokens: 1`` (prompt log-probabilities).
- ``hf``: lm-eval's transformers backend, loading the same GGUF file (``gguf_file=``).

Why the comparison is per item and not only the accuracy: two backends can agree on argmax while
disagreeing on every number; the issue asks for each choice's log-likelihood within 1e-3.

``--prompts``: lm-eval sends token ids by default, as a batch ``[[ids...]]`` (``--batch-size``
prompts per request). ``text`` sends text instead (``tokenized_requests=False``: lm-eval decodes
the ids and the server tokenizes them again); ``auto`` probes whether the server takes token-id
batches (it did not before 2026-11-29 17:40) and falls back to text with a note.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

HERE = Path(__file__).resolve().parent
TASK_YAML = HERE / "tokenfactory_mc.yaml"
MODEL_NAME = "smollm2"
TOLERANCE = 1e-3


@dataclass
class Scored:
    """One choice of one item as a backend scored it."""
    doc_id: int
    choice: int
    loglikelihood: float
    is_greedy: bool


@dataclass
class BackendResult:
    name: str
    acc: float
    acc_norm: float
    items: dict[tuple[int, int], Scored]   # (doc_id, choice) -> score
    seconds: float


def task_config() -> dict:
    """The task YAML as a config dict, its data file made absolute (the YAML's path is relative
    to the repository root, which is what the ``lm_eval --include_path`` CLI run needs)."""
    config = yaml.safe_load(TASK_YAML.read_text())
    config["dataset_kwargs"]["data_files"]["test"] = str(HERE / "tokenfactory_mc.jsonl")
    return config


def gguf_path() -> Path:
    from tokenfactory.model.default import default_model_path
    return Path(default_model_path())


def export_tokenizer(gguf: Path, out_dir: Path) -> Path:
    """The GGUF's tokenizer as a Hugging Face tokenizer directory (transformers reads it from
    the GGUF metadata); lm-eval's API models need one to count context tokens."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(str(out_dir))
    return out_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(dtype: str = "float32", port: int | None = None, timeout: float = 180.0):
    """``tokenfactory serve`` as a child process on a free port; yields its base URL and stops
    it (SIGTERM, then SIGKILL) on the way out."""
    port = port or free_port()
    exe = Path(sys.executable).with_name("tokenfactory")
    cmd = [str(exe), "serve", "--dtype", dtype, "--port", str(port),
           "--served-model-name", MODEL_NAME, "--max-model-len", "2048"]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"tokenfactory serve exited {proc.returncode}:\n"
                                   f"{log.read().decode(errors='replace')[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/v1/models", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"tokenfactory serve did not answer within {timeout} s")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def accepts_token_batches(base: str) -> bool:
    """Does the server take lm-eval's tokenized request shape, ``prompt: [[ids...]]``?"""
    r = httpx.post(base + "/v1/completions", timeout=60, json={
        "model": MODEL_NAME, "prompt": [[504, 3458]], "max_tokens": 1, "logprobs": 1,
        "echo": True, "temperature": 0})
    return r.status_code == 200


def _scores(samples: list[dict]) -> dict[tuple[int, int], Scored]:
    """lm-eval's logged samples -> per-choice scores. ``resps[c][0]`` is the backend's
    (log-likelihood, is_greedy) of choice c's continuation."""
    out = {}
    for s in samples:
        for c, resp in enumerate(s["resps"]):
            ll, greedy = resp[0]
            out[(s["doc_id"], c)] = Scored(s["doc_id"], c, float(ll), bool(greedy))
    return out


def run_lm_eval(name: str, model: str, model_args: dict, limit: int | None,
                batch_size: int = 1) -> BackendResult:
    """One ``lm_eval.simple_evaluate`` of the task with per-sample logging."""
    import lm_eval
    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task_config()],
                                  limit=limit, batch_size=batch_size, log_samples=True,
                                  random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                  fewshot_random_seed=0)
    seconds = time.perf_counter() - t0
    metrics = res["results"]["tokenfactory_mc"]
    return BackendResult(name, metrics["acc,none"], metrics["acc_norm,none"],
                         _scores(res["samples"]["tokenfactory_mc"]), seconds)


def run_server_backend(base: str, tokenizer_dir: Path, limit: int | None, tokenized: bool,
                       num_concurrent: int = 1, batch_size: int = 1) -> BackendResult:
    """lm-eval's ``local-completions`` against ``base``; ``batch_size`` prompts per request
    (several prompts in one request need token-id prompts or a server taking lists of
    strings)."""
    args = {"model": MODEL_NAME, "base_url": base + "/v1/completions",
            "tokenizer": str(tokenizer_dir), "tokenizer_backend": "huggingface",
            "tokenized_requests": tokenized, "num_concurrent": num_concurrent,
            "max_retries": 1}
    return run_lm_eval("local-completions", "local-completions", args, limit, batch_size)


def run_hf_backend(gguf: Path, tokenizer_dir: Path, limit: int | None,
                   batch_size: int = 8) -> BackendResult:
    args = {"pretrained": str(gguf.parent), "gguf_file": gguf.name,
            "tokenizer": str(tokenizer_dir), "dtype": "float32", "device": "cpu"}
    return run_lm_eval("hf", "hf", args, limit, batch_size=batch_size)


def compare(a: BackendResult, b: BackendResult) -> list[tuple[int, int, float, float, float]]:
    """(doc_id, choice, a's log-likelihood, b's, |difference|) for every choice both scored."""
    if a.items.keys() != b.items.keys():
        raise AssertionError(f"the backends scored different items: "
                             f"{sorted(a.items.keys() ^ b.items.keys())[:10]}")
    return [(d, c, a.items[d, c].loglikelihood, b.items[d, c].loglikelihood,
             abs(a.items[d, c].loglikelihood - b.items[d, c].loglikelihood))
            for d, c in sorted(a.items)]


def print_report(server: BackendResult, hf: BackendResult, rows, prompts: str) -> None:
    print(f"{'doc':>4} {'choice':>6} {'server ll':>12} {'hf ll':>12} {'|diff|':>10}")
    for d, c, x, y, diff in rows:
        flag = "" if diff <= TOLERANCE else "  <-- above 1e-3"
        print(f"{d:4d} {c:6d} {x:12.6f} {y:12.6f} {diff:10.2e}{flag}")
    diffs = [r[4] for r in rows]
    print()
    print(f"items {len({r[0] for r in rows})}, choices {len(rows)}, prompts sent as {prompts}")
    print(f"{'backend':18s} {'acc':>6} {'acc_norm':>9} {'seconds':>8}")
    for r in (server, hf):
        print(f"{r.name:18s} {r.acc:6.3f} {r.acc_norm:9.3f} {r.seconds:8.1f}")
    print(f"max |loglikelihood diff| {max(diffs):.2e}, mean {sum(diffs) / len(diffs):.2e}, "
          f"above {TOLERANCE}: {sum(d > TOLERANCE for d in diffs)}")
    greedy = sum(server.items[k].is_greedy != hf.items[k].is_greedy for k in server.items)
    print(f"is_greedy disagreements: {greedy}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="first N items only")
    ap.add_argument("--prompts", choices=["auto", "tokens", "text"], default="auto")
    ap.add_argument("--num-concurrent", type=int, default=1,
                    help="lm-eval's concurrent requests to the server")
    ap.add_argument("--batch-size", type=int, default=1,
                    help="prompts per request from lm-eval (its batch_size)")
    ap.add_argument("--json", type=Path, default=None, help="write per-item results here")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    gguf = gguf_path()
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = export_tokenizer(gguf, Path(tmp) / "tokenizer")
        with served() as base:
            tokens = {"tokens": True, "text": False}.get(args.prompts)
            if tokens is None:
                tokens = accepts_token_batches(base)
                if not tokens:
                    print("note: the server answers 400 to prompt: [[ids...]] (lm-eval's "
                          "tokenized requests); sending text prompts instead", file=sys.stderr)
            server = run_server_backend(base, tok_dir, args.limit, tokens, args.num_concurrent,
                                        args.batch_size)
        hf = run_hf_backend(gguf, tok_dir, args.limit)
    rows = compare(server, hf)
    print_report(server, hf, rows, "token ids" if tokens else "text")
    if args.json:
        args.json.write_text(json.dumps({
            "prompts": "tokens" if tokens else "text",
            "acc": {"server": server.acc, "hf": hf.acc},
            "acc_norm": {"server": server.acc_norm, "hf": hf.acc_norm},
            "items": [{"doc_id": d, "choice": c, "server": x, "hf": y, "diff": diff}
                      for d, c, x, y, diff in rows]}, indent=1))
    ok = max(r[4] for r in rows) <= TOLERANCE and server.acc == hf.acc
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
