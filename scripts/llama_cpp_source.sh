#!/usr/bin/env bash
# Fetch llama.cpp's source as vendored in the llama-cpp-python sdist (the version quantmill pins)
# into .cache/llama.cpp, and with --build also build llama-perplexity, llama-quantize,
# llama-imatrix and llama-gguf-split into .cache/llama.cpp-build/bin.
# For reference comparisons and benchmarks only: quantmill never needs these at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
DEST=.cache/llama.cpp
if [ ! -f "$DEST/convert_hf_to_gguf.py" ]; then
    tmp=$(mktemp -d)
    .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
        "llama-cpp-python==$VERSION" -d "$tmp"
    tar xzf "$tmp"/llama_cpp_python-$VERSION.tar.gz -C "$tmp"
    mkdir -p .cache
    rm -rf "$DEST"
    mv "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp" "$DEST"
    rm -rf "$tmp"
fi
if [ "${1:-}" = "--build" ]; then
    BUILD=.cache/llama.cpp-build
    cmake -S "$DEST" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF > /dev/null
    cmake --build "$BUILD" -j"$(nproc)" --target llama-perplexity llama-quantize llama-imatrix \
        llama-gguf-split > /dev/null
    echo "$BUILD/bin"
fi
echo "$DEST"
