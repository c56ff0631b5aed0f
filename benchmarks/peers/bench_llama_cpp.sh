#!/usr/bin/env bash
# The llama.cpp peer, end to end, in the same session as our own runs:
#   build llama-server (cached) -> convert the checkpoint to GGUF (cached) -> start it on loopback
#   -> one short warm-up request -> `tokenfactory bench` against it (OpenAI API) -> stop it.
#
#   benchmarks/peers/bench_llama_cpp.sh [MODEL_DIR] [bf16|f32] [-- extra bench args]
#   e.g. benchmarks/peers/bench_llama_cpp.sh "" bf16 -- --workload agentic --json llama_agentic.json
#
# MODEL_DIR defaults to the random ~100M bench checkpoint (the one `tokenfactory bench` uses).
# Slots: $SLOTS, else the --sessions value (or the largest --sweep count) among the bench args,
# else 4 (the agentic default), so every agentic session keeps its own slot and its own cached
# prompt; CTX_PER_SLOT (default 32768, the model's trained context) bounds each slot's prompt +
# output. KV cache type: f16 for bf16
# weights (llama.cpp's default; 2 bytes per value like tokenfactory's bf16 KV), f32 for f32
# weights; KV_TYPE overrides (e.g. KV_TYPE=bf16 for bit-for-bit the same KV precision as ours).
# The exit status is the bench's. When the peer cannot be built or converted the script says so
# and exits 0, so a benchmark session carries on without it.
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
MODEL="${1:-}"; shift || true
OUTTYPE="${1:-bf16}"; shift || true
[ "${1:-}" = "--" ] && shift
[ -n "$MODEL" ] || MODEL="$("$PY" -m tokenfactory.cli bench build-model --size 100m)"
PORT="${PORT:-$("$PY" -c 'from tokenfactory.bench.targets import free_port; print(free_port())')}"
if [ -z "${SLOTS:-}" ]; then
  SLOTS=4
  prev="" sweep=""
  for a in "$@"; do
    case "$a" in --sessions=*) SLOTS="${a#--sessions=}" ;; --sweep=*) sweep="${a#--sweep=}" ;; esac
    [ "$prev" = "--sessions" ] && SLOTS="$a"
    [ "$prev" = "--sweep" ] && sweep="$a"
    prev="$a"
  done
  for n in ${sweep//,/ }; do [ "$n" -gt "$SLOTS" ] && SLOTS="$n"; done   # --sweep: its largest count
fi
case "$OUTTYPE" in bf16) DTYPE=bfloat16 ;; f32) DTYPE=float32 ;; *) DTYPE="" ;; esac
[ "$OUTTYPE" = f32 ] && KV_TYPE="${KV_TYPE:-f32}" || KV_TYPE="${KV_TYPE:-f16}"

BIN="$(nice -n 19 "$HERE/build_llama_server.sh" | tail -1)" || { echo "[peer] llama.cpp: not built, skipping the peer" >&2; exit 0; }
GGUF="$("$PY" "$HERE/convert_to_gguf.py" "$MODEL" --outtype "$OUTTYPE" | tail -1)" || { echo "[peer] llama.cpp: conversion failed, skipping the peer" >&2; exit 0; }
LOG="$(mktemp -t llama-server.XXXXXX.log)"
LLAMA_SERVER="$BIN" KV_TYPE="$KV_TYPE" "$HERE/run_llama_server.sh" "$GGUF" "$PORT" "$SLOTS" "${CTX_PER_SLOT:-32768}" > "$LOG" 2>&1 &
PID=$!                                   # run_llama_server.sh execs llama-server: this is its pid
BENCH=""
cleanup() {
  [ -n "$BENCH" ] && kill "$BENCH" 2>/dev/null && wait "$BENCH" 2>/dev/null
  kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
  echo "[peer] llama-server stopped (log $LOG)" >&2
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
URL="http://127.0.0.1:$PORT"
up=""
for _ in $(seq 1 240); do
  curl -sf "$URL/health" >/dev/null && { up=1; break; }
  kill -0 "$PID" 2>/dev/null || { echo "[peer] llama-server exited; log:" >&2; tail -20 "$LOG" >&2; exit 0; }
  sleep 0.5
done
[ -n "$up" ] || { echo "[peer] llama-server did not answer /health within 120 s; log:" >&2; tail -20 "$LOG" >&2; exit 1; }
grep -E "n_slots|n_ctx_slot" "$LOG" | tail -1 >&2
echo "[peer] llama-server $("$BIN" --version 2>&1 | grep -m1 version) $OUTTYPE (KV cache $KV_TYPE) on $URL, $SLOTS slots" >&2
# warm-up (thread pool, graph allocation), as tokenfactory serve warms up before /health answers;
# it leaves at most its ChatML opener (2 tokens) in one slot's cache
curl -sf "$URL/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"messages":[{"role":"user","content":"Warm up."}],"max_tokens":8,"ignore_eos":true,"cache_prompt":false}' \
  >/dev/null || echo "[peer] warm-up request failed" >&2
"$PY" -m tokenfactory.cli bench --target "$URL" --api openai --label "llama.cpp-$OUTTYPE" \
  --model "$MODEL" --sessions "$SLOTS" ${DTYPE:+--dtype "$DTYPE"} "$@" &
BENCH=$!
wait "$BENCH"
rc=$?
BENCH=""
exit "$rc"
