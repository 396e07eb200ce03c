#!/usr/bin/env bash
# Build llama.cpp's own `llama-quantize` and `llama-imatrix` from the llama.cpp that the
# llama-cpp-python sdist on PyPI vendors (the same llama.cpp release that bench/llamacpp_ppl.py
# and the GGUF round trip run), so the quality benchmark can quantize the original weights the
# way llama.cpp users do, with and without an importance matrix. Nothing is installed system-wide:
# the binaries land in $MIXBITS_HOME/tools/llama.cpp-<version>/bin (printed at the end).
# ~8-15 min on 2 cores; needs cmake and a C++ compiler. Rerunning reuses a finished build.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
HOME_DIR="${MIXBITS_HOME:-$HOME/.cache/mixbits}"
ROOT="$HOME_DIR/tools/llama.cpp-$VERSION"
BIN="$ROOT/bin"
if [[ -x "$BIN/llama-quantize" && -x "$BIN/llama-imatrix" ]]; then echo "$BIN"; exit 0; fi
mkdir -p "$ROOT"
SDIST="$(ls "$ROOT"/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null || true)"
if [[ -z "$SDIST" ]]; then
  python3 -m pip download --no-deps --no-binary :all: --no-build-isolation "llama-cpp-python==$VERSION" -d "$ROOT" >&2
  SDIST="$ROOT/llama_cpp_python-$VERSION.tar.gz"
fi
SRC="$ROOT/src"
if [[ ! -d "$SRC/vendor/llama.cpp" ]]; then
  rm -rf "$SRC.tmp" && mkdir -p "$SRC.tmp"
  tar xzf "$SDIST" -C "$SRC.tmp" --strip-components=1
  mv "$SRC.tmp" "$SRC"
fi
cmake -S "$SRC/vendor/llama.cpp" -B "$ROOT/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_BUILD_TOOLS=ON >&2
cmake --build "$ROOT/build" --target llama-quantize llama-imatrix -j "${JOBS:-2}" >&2
mkdir -p "$BIN.tmp"
cp "$ROOT/build/bin/llama-quantize" "$ROOT/build/bin/llama-imatrix" "$BIN.tmp/"
rm -rf "$BIN" && mv "$BIN.tmp" "$BIN"
echo "$BIN"
