"""lm-evaluation-harness, a client nobody here wrote, scores our multiple-choice task through
``tokenfactory serve`` as transformers scores it on the same weights.

The client is lm-eval's own ``local-completions`` model, unmodified, against a real
``tokenfactory serve --dtype float32`` process (benchmarks/lm_eval/run.py starts it). The
reference is computed here with transformers directly on the same GGUF file (dequantized to
float32) and the same tokenizer, so the check does not lean on lm-eval's own slicing of the
echoed log-probabilities. The full 50-item comparison against lm-eval's ``hf`` backend is
``python benchmarks/lm_eval/run.py`` (docs/eval.md).
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ITEMS = 10


def _runner():
    """benchmarks/lm_eval/run.py as a module (benchmarks/ is not a package)."""
    name = "tokenfactory_lm_eval_runner"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks/lm_eval/run.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def runner():
    return _runner()


@pytest.fixture(scope="module")
def tokenizer_dir(runner, tmp_path_factory):
    return runner.export_tokenizer(runner.gguf_path(), tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def server(runner):
    with runner.served(dtype="float32") as base:
        yield base


@pytest.fixture(scope="module")
def reference(runner, tokenizer_dir):
    """{(doc_id, choice): log-likelihood} and the accuracy, from transformers on the GGUF
    weights: sum of log p(continuation token | everything before it), where the continuation
    is " " + choice and its tokens are those of the whole text after the context's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = runner.gguf_path()
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32).eval()
    docs = [json.loads(line) for line in
            (ROOT / "benchmarks/lm_eval/tokenfactory_mc.jsonl").read_text().splitlines()][:ITEMS]
    scores, correct = {}, 0
    with torch.no_grad():
        for doc in docs:
            context = f"Question: {doc['question']}\nAnswer:"
            ctx = tok(context, add_special_tokens=False).input_ids
            for c, choice in enumerate(doc["choices"]):
                whole = tok(context + " " + choice, add_special_tokens=False).input_ids
                assert whole[:len(ctx)] == ctx
                ids = torch.tensor([whole])
                logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)  # (T, V)
                scores[doc["id"], c] = sum(logprobs[t - 1, whole[t]].item()
                                           for t in range(len(ctx), len(whole)))
            best = max(range(len(doc["choices"])), key=lambda c: scores[doc["id"], c])
            correct += best == doc["answer"]
    return scores, correct / len(docs)


def _check(result, reference, tolerance):
    scores, acc = reference
    diffs = {k: abs(item.loglikelihood - scores[k]) for k, item in result.items.items()}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= tolerance, (worst, result.items[worst], scores[worst])
    return scores, acc


def test_lm_eval_local_completions_matches_transformers(runner, server, tokenizer_dir,
                                                         reference):
    """lm-eval's default requests (token ids, here 4 prompts per request): every choice's
    log-likelihood as lm-eval reads it from our /v1/completions (echo + logprobs) is
    transformers' to within 1e-3 in float32, and so is the accuracy."""
    result = runner.run_server_backend(server, tokenizer_dir, ITEMS, tokenized=True,
                                       batch_size=4)
    scores, acc = _check(result, reference, runner.TOLERANCE)
    assert set(result.items) == set(scores)
    assert result.acc == pytest.approx(acc)
    # the choices differ, so a server that answered one number for all would fail above
    assert len({round(v, 3) for v in scores.values()}) > len(scores) // 2


def test_lm_eval_text_prompts(runner, server, tokenizer_dir, reference):
    """tokenized_requests=False: lm-eval sends the text and the server tokenizes it; the
    numbers are the same (this tokenizer's decode/encode round trips on these prompts)."""
    result = runner.run_server_backend(server, tokenizer_dir, 3, tokenized=False)
    assert len(result.items) == 12
    _check(result, reference, runner.TOLERANCE)
