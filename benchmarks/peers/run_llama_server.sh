#!/usr/bin/env bash
# Run llama.cpp's server on loopback with several parallel slots (foreground; Ctrl-C stops it).
#
#   benchmarks/peers/run_llama_server.sh MODEL.gguf [PORT] [SLOTS] [CTX_PER_SLOT]
#
# Defaults: port 8091, 4 slots (one per agentic session), 16384 tokens of context per slot
# (llama-server splits -c across slots), 2 threads, prompt caching on (its default), the GGUF's
# own chat template (--jinja). Exit status 3: no llama-server binary (build it first).
set -euo pipefail
GGUF="${1:?usage: run_llama_server.sh MODEL.gguf [PORT] [SLOTS] [CTX_PER_SLOT]}"
PORT="${2:-8091}"
SLOTS="${3:-4}"
CTX="${4:-16384}"
THREADS="${THREADS:-$(nproc)}"
BIN="${LLAMA_SERVER:-${TOKENFACTORY_CACHE:-$HOME/.cache/tokenfactory}/llama.cpp/bin/llama-server}"
[ -x "$BIN" ] || { echo "llama.cpp peer unavailable: no $BIN (run benchmarks/peers/build_llama_server.sh)" >&2; exit 3; }
exec "$BIN" -m "$GGUF" --host 127.0.0.1 --port "$PORT" -np "$SLOTS" -c $((SLOTS * CTX)) \
  -t "$THREADS" --jinja --no-webui ${LLAMA_SERVER_ARGS:-}
