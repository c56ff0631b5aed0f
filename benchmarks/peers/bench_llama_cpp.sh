#!/usr/bin/env bash
# The llama.cpp peer, end to end, in the same session as our own runs:
#   build llama-server (cached) -> convert the checkpoint to GGUF -> start it on loopback ->
#   `tokenfactory bench` against it (OpenAI API) -> stop it.
#
#   benchmarks/peers/bench_llama_cpp.sh [MODEL_DIR] [bf16|f32] [-- extra bench args]
#   e.g. benchmarks/peers/bench_llama_cpp.sh "" bf16 -- --workload agentic --json llama_agentic.json
#
# MODEL_DIR defaults to the random ~100M bench checkpoint. When the peer cannot be built or
# converted the script says so and exits 0, so a benchmark session carries on without it.
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
MODEL="${1:-}"; shift || true
OUTTYPE="${1:-bf16}"; shift || true
[ "${1:-}" = "--" ] && shift
[ -n "$MODEL" ] || MODEL="$("$PY" -m tokenfactory.cli bench build-model --size 100m)"
PORT="${PORT:-$("$PY" -c 'from tokenfactory.bench.targets import free_port; print(free_port())')}"
SLOTS="${SLOTS:-4}"

BIN="$(nice -n 19 "$HERE/build_llama_server.sh" | tail -1)" || { echo "[peer] llama.cpp: not built, skipping the peer" >&2; exit 0; }
GGUF="$("$PY" "$HERE/convert_to_gguf.py" "$MODEL" --outtype "$OUTTYPE" | tail -1)" || { echo "[peer] llama.cpp: conversion failed, skipping the peer" >&2; exit 0; }
LOG="$(mktemp -t llama-server.XXXXXX.log)"
LLAMA_SERVER="$BIN" "$HERE/run_llama_server.sh" "$GGUF" "$PORT" "$SLOTS" > "$LOG" 2>&1 &
PID=$!
trap 'kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null' EXIT
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 "$PID" 2>/dev/null || { echo "[peer] llama-server exited; log:" >&2; tail -20 "$LOG" >&2; exit 0; }
  sleep 1
done
echo "[peer] llama-server $OUTTYPE on 127.0.0.1:$PORT with $SLOTS slots (log $LOG)" >&2
"$PY" -m tokenfactory.cli bench --target "http://127.0.0.1:$PORT" --api openai --label "llama.cpp-$OUTTYPE" \
  --model "$MODEL" --sessions "$SLOTS" "$@"
