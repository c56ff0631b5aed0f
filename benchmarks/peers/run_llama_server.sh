#!/usr/bin/env bash
# Run llama.cpp's server on loopback with several parallel slots (foreground; Ctrl-C stops it).
#
#   benchmarks/peers/run_llama_server.sh MODEL.gguf [PORT] [SLOTS] [CTX_PER_SLOT]
#
# Defaults: port 8091, 4 slots (one per agentic session), 32768 tokens of context per slot
# (llama-server splits -c across slots and caps a slot at the model's trained context; the
# default 4x10 agentic run reaches ~17.6K tokens in one session, more than 16K), 2 threads
# (all cores), prompt caching on (its default), the GGUF's own chat template (--jinja).
# KV_TYPE (f32|f16|bf16, default f16 = llama.cpp's default) sets the KV cache type; the peer
# script sets it to the weights' type, as tokenfactory keeps its KV cache in the model dtype.
# Extra flags: LLAMA_SERVER_ARGS. Exit status 3: no llama-server binary (build it first).
set -euo pipefail
GGUF="${1:?usage: run_llama_server.sh MODEL.gguf [PORT] [SLOTS] [CTX_PER_SLOT]}"
PORT="${2:-8091}"
SLOTS="${3:-4}"
CTX="${4:-32768}"
THREADS="${THREADS:-$(nproc)}"
KV_TYPE="${KV_TYPE:-f16}"
BIN="${LLAMA_SERVER:-${TOKENFACTORY_CACHE:-$HOME/.cache/tokenfactory}/llama.cpp/bin/llama-server}"
[ -x "$BIN" ] || { echo "llama.cpp peer unavailable: no $BIN (run benchmarks/peers/build_llama_server.sh)" >&2; exit 3; }
# shellcheck disable=SC2086  # LLAMA_SERVER_ARGS is a list of flags
exec "$BIN" -m "$GGUF" --host 127.0.0.1 --port "$PORT" -np "$SLOTS" -c $((SLOTS * CTX)) \
  -t "$THREADS" -ctk "$KV_TYPE" -ctv "$KV_TYPE" --jinja --no-webui ${LLAMA_SERVER_ARGS:-}
