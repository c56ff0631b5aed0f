#!/usr/bin/env bash
# Run llama.cpp's server on loopback with several parallel slots (foreground; Ctrl-C stops it).
#
#   benchmarks/peers/run_llama_server.sh MODEL.gguf [PORT] [SLOTS] [CTX_PER_SLOT]
#   e.g. run_llama_server.sh SmolLM2-135M-Instruct.Q4_1.gguf 8091 16 2560   (benchmarks/real_model.md)
#
# Defaults: port 8091, 4 slots (one per agentic session), 32768 tokens of context per slot
# (llama-server splits -c across slots and caps a slot at the model's trained context; the
# default 4x10 agentic run reaches ~17.6K tokens in one session, more than 16K), 2 threads
# (all cores), prompt caching on (its default), the GGUF's own chat template (--jinja).
# KV_TYPE (f32|f16|bf16, default f16 = llama.cpp's default) sets the KV cache type; the peer
# script sets it to the weights' type, as tokenfactory keeps its KV cache in the model dtype.
# NO_REPACK (auto|1|0, default auto): pass --no-repack, i.e. keep quantized weights in the file's
# layout instead of repacking them for the CPU's wide kernels. auto = on when /proc/cpuinfo lists
# AMX (amx_tile): there llama-server crashes on Q4_1 GGUFs (e.g. SmolLM2-135M-Instruct.Q4_1) while
# repacking for AMX, a llama.cpp bug; elsewhere (AVX-512/AVX2 without AMX) repacking stays on.
# Extra flags: LLAMA_SERVER_ARGS. Exit status 3: no llama-server binary (build it first).
set -euo pipefail
GGUF="${1:?usage: run_llama_server.sh MODEL.gguf [PORT] [SLOTS] [CTX_PER_SLOT]}"
PORT="${2:-8091}"
SLOTS="${3:-4}"
CTX="${4:-32768}"
THREADS="${THREADS:-$(nproc)}"
KV_TYPE="${KV_TYPE:-f16}"
BIN="${LLAMA_SERVER:-${TOKENFACTORY_CACHE:-$HOME/.cache/tokenfactory}/llama.cpp/bin/llama-server}"
REPACK_ARGS=""
case "${NO_REPACK:-auto}" in
  1) REPACK_ARGS="--no-repack" ;;
  auto) if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then REPACK_ARGS="--no-repack"; fi ;;
esac
[ -x "$BIN" ] || { echo "llama.cpp peer unavailable: no $BIN (run benchmarks/peers/build_llama_server.sh)" >&2; exit 3; }
# shellcheck disable=SC2086  # LLAMA_SERVER_ARGS is a list of flags
exec "$BIN" -m "$GGUF" --host 127.0.0.1 --port "$PORT" -np "$SLOTS" -c $((SLOTS * CTX)) \
  -t "$THREADS" -ctk "$KV_TYPE" -ctv "$KV_TYPE" --jinja --no-webui $REPACK_ARGS ${LLAMA_SERVER_ARGS:-}
