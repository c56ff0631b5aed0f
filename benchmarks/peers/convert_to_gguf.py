#!/usr/bin/env python3
"""Convert a Hugging Face checkpoint to GGUF with llama.cpp's own converter, for the llama.cpp peer.

    .venv/bin/python benchmarks/peers/convert_to_gguf.py MODEL_DIR --outtype bf16   # or f32
    -> ~/.cache/tokenfactory/gguf/<model-dir-name>-<outtype>.gguf  (path printed on stdout)

Uses the `convert_hf_to_gguf.py` vendored in the llama-cpp-python sdist that
`build_llama_server.sh` unpacked under ~/.cache/tokenfactory/llama.cpp/src (nothing from
llama.cpp is in this repository). Its Python needs (sentencepiece) are pip-installed with
`--target` into ~/.cache/tokenfactory/llama.cpp/pydeps, so the project's venv is untouched.

One fix-up: the converter identifies a BPE tokenizer's pre-tokenizer by hashing how it splits a
test string and refuses unknown hashes ("BPE pre-tokenizer was not recognized"). Our demo
tokenizer is a freshly trained byte-level BPE whose pre-tokenizer *is* GPT-2's (ByteLevel with
the GPT-2 split regex), so for such a tokenizer we answer "gpt-2" (the name llama.cpp's loader
maps to its GPT-2 regex; a plain "gpt2" is rejected at load time with "unknown pre-tokenizer
type") instead of failing; anything else still fails as before. A cached GGUF is reused only when
it is newer than both the checkpoint's config.json and this script. Exit status 3: the peer is unavailable (the caller carries on).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CACHE = Path(os.environ.get("TOKENFACTORY_CACHE", Path.home() / ".cache" / "tokenfactory"))
LLAMA = CACHE / "llama.cpp" / "src" / "vendor" / "llama.cpp"
PYDEPS = CACHE / "llama.cpp" / "pydeps"


def unavailable(msg: str) -> "NoReturn":  # noqa: F821
    print(f"llama.cpp peer unavailable: {msg}", file=sys.stderr)
    sys.exit(3)


def is_gpt2_byte_level(model_dir: Path) -> bool:
    """True when tokenizer.json pre-tokenizes exactly like GPT-2 (ByteLevel with its regex)."""
    try:
        tok = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return (len(steps) == 1 and steps[0].get("type") == "ByteLevel"
            and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space", False)
            and (tok.get("model") or {}).get("type") == "BPE")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("--outtype", choices=["bf16", "f32", "f16"], default="bf16")
    p.add_argument("--outfile", default=None)
    args = p.parse_args()
    model_dir = Path(args.model_dir).resolve()
    out = Path(args.outfile) if args.outfile else CACHE / "gguf" / f"{model_dir.name}-{args.outtype}.gguf"
    newest_input = max((model_dir / "config.json").stat().st_mtime, Path(__file__).stat().st_mtime)
    if out.exists() and out.stat().st_mtime >= newest_input:
        print(out)
        return 0
    if not (LLAMA / "convert_hf_to_gguf.py").exists():
        unavailable(f"no llama.cpp sources at {LLAMA}; run benchmarks/peers/build_llama_server.sh first")
    sys.path[:0] = [str(PYDEPS), str(LLAMA / "gguf-py"), str(LLAMA)]
    try:
        import sentencepiece  # noqa: F401  (imported by the converter)
    except ImportError:
        print("installing sentencepiece into the peer's own directory ...", file=sys.stderr)
        rc = subprocess.call([sys.executable, "-m", "pip", "install", "-q", "--target", str(PYDEPS),
                              "sentencepiece"])
        if rc != 0:
            unavailable("pip could not install sentencepiece")
        import importlib
        importlib.invalidate_caches()
    try:
        import conversion.base as base
        import convert_hf_to_gguf
    except Exception as exc:  # noqa: BLE001
        unavailable(f"cannot import llama.cpp's converter: {type(exc).__name__}: {exc}")

    original = base.TextModel.get_vocab_base_pre
    gpt2_like = is_gpt2_byte_level(model_dir)

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            if not gpt2_like:
                raise
            print("pre-tokenizer not in llama.cpp's list; it is GPT-2's byte-level one: using 'gpt-2'",
                  file=sys.stderr)
            return "gpt-2"

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    out.parent.mkdir(parents=True, exist_ok=True)
    sys.argv = ["convert_hf_to_gguf.py", str(model_dir), "--outtype", args.outtype, "--outfile", str(out)]
    try:
        convert_hf_to_gguf.main()
    except SystemExit as exc:
        if exc.code not in (0, None):
            unavailable(f"conversion failed (exit {exc.code})")
    except Exception as exc:  # noqa: BLE001
        unavailable(f"conversion failed: {type(exc).__name__}: {exc}")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
