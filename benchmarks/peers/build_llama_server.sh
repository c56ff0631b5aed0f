#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (and `llama-quantize`, which makes the bf16 GGUF of
# benchmarks/real_model.md) from the llama-cpp-python sdist on PyPI (its vendored llama.cpp).
#
# The llama-cpp-python wheel ships only shared libraries, so the server binary is built here with
# cmake. Everything (sdist, sources, build, binary) lives under the cache dir, outside the repo:
#   ${TOKENFACTORY_CACHE:-~/.cache/tokenfactory}/llama.cpp/
# Re-running is a no-op once the binary exists. Prints the binary path on the last line of stdout.
# Exit status 3 means "could not build": callers (bench) report that and carry on without the peer.
#
#   benchmarks/peers/build_llama_server.sh            # ~5 min on 2 cores; run it under `nice -n 19`
#   LLAMA_CPP_PYTHON_VERSION=0.3.36 benchmarks/peers/build_llama_server.sh
set -euo pipefail

CACHE="${TOKENFACTORY_CACHE:-$HOME/.cache/tokenfactory}/llama.cpp"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-}"
PIP="${PIP:-$(dirname "$0")/../../.venv/bin/pip}"
[ -x "$PIP" ] || PIP="python3 -m pip"
JOBS="${JOBS:-$(nproc)}"
BIN="$CACHE/bin/llama-server"
QUANTIZE="$CACHE/bin/llama-quantize"

if [ -x "$BIN" ] && [ -x "$QUANTIZE" ]; then
  echo "llama-server already built" >&2
  echo "$BIN"
  exit 0
fi
for tool in cmake make g++; do
  command -v "$tool" >/dev/null || { echo "cannot build llama-server: '$tool' not found" >&2; exit 3; }
done
mkdir -p "$CACHE/sdist" "$CACHE/bin"

spec="llama-cpp-python${VERSION:+==$VERSION}"
if ! ls "$CACHE"/sdist/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
  echo "downloading the $spec sdist ..." >&2
  $PIP download --no-binary :all: --no-deps -d "$CACHE/sdist" "$spec" >&2 \
    || { echo "cannot build llama-server: pip download of $spec failed" >&2; exit 3; }
fi
tarball=$(ls "$CACHE"/sdist/llama_cpp_python-*.tar.gz | sort -V | tail -1)
src="$CACHE/src"
if [ ! -d "$src/vendor/llama.cpp" ]; then
  rm -rf "$src" && mkdir -p "$src"
  tar -xzf "$tarball" -C "$src" --strip-components=1
fi
llama="$src/vendor/llama.cpp"
[ -f "$llama/CMakeLists.txt" ] || { echo "cannot build llama-server: no vendored llama.cpp in $tarball" >&2; exit 3; }

echo "configuring llama.cpp from $(basename "$tarball") ..." >&2
cmake -S "$llama" -B "$CACHE/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >&2 \
  || { echo "cannot build llama-server: cmake configure failed" >&2; exit 3; }
echo "building llama-server and llama-quantize with $JOBS jobs (about 5 minutes on 2 cores) ..." >&2
cmake --build "$CACHE/build" --target llama-server llama-quantize -j "$JOBS" >&2 \
  || { echo "cannot build llama-server: compilation failed" >&2; exit 3; }
for name in llama-server llama-quantize; do
  built=$(find "$CACHE/build" -name "$name" -type f -perm -u+x | head -1)
  [ -n "$built" ] || { echo "cannot build $name: binary not found after the build" >&2; exit 3; }
  cp "$built" "$CACHE/bin/$name"
done
# the converter and its gguf-py package, used by convert_to_gguf.py (kept in the cache, not the repo)
echo "built $BIN" >&2
echo "$BIN"
