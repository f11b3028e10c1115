#!/usr/bin/env bash
# Fetch llama.cpp's source as vendored in the llama-cpp-python sdist that quantmill pins into
# the cache ($QUANTMILL_CACHE, default ~/.cache/quantmill), and with --build also build
# llama-perplexity, llama-quantize, llama-imatrix and llama-gguf-split next to it.
# For parity tests and benchmarks only: quantmill never runs these at run time.
# Prints the source directory (and, with --build, the tools' directory).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/llama_cpp_cmake_args.sh  # the version and the build flags, shared with the wheel (setup.sh)
VERSION=$LLAMA_CPP_VERSION
CACHE=${QUANTMILL_CACHE:-$HOME/.cache/quantmill}
DEST=${QUANTMILL_LLAMA_CPP_DIR:-$CACHE/llama.cpp-$VERSION}
BUILD=$CACHE/llama.cpp-$VERSION-build  # built with LLAMA_CPP_CMAKE; $BUILD/.build-tag names the flags
if [ ! -f "$DEST/convert_hf_to_gguf.py" ]; then
    tmp=$(mktemp -d)
    .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
        "llama-cpp-python==$VERSION" -d "$tmp"
    tar xzf "$tmp"/llama_cpp_python-$VERSION.tar.gz -C "$tmp"
    mkdir -p "$(dirname "$DEST")"
    rm -rf "$DEST"
    mv "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp" "$DEST"
    rm -rf "$tmp"
fi
echo "$DEST"
if [ "${1:-}" = "--build" ]; then
    tools="llama-perplexity llama-quantize llama-imatrix llama-gguf-split"
    missing=0
    for t in $tools; do [ -x "$BUILD/bin/$t" ] || missing=1; done
    if [ "$(cat "$BUILD/.build-tag" 2>/dev/null)" != "$LLAMA_CPP_BUILD_TAG" ]; then
        rm -rf "$BUILD"
        missing=1
    fi
    if [ "$missing" = 1 ]; then
        cmake -S "$DEST" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF "${LLAMA_CPP_CMAKE[@]}" \
            -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF > "$CACHE/llama.cpp-build.log" 2>&1
        cmake --build "$BUILD" -j"$(nproc)" --target $tools >> "$CACHE/llama.cpp-build.log" 2>&1
        echo "$LLAMA_CPP_BUILD_TAG" > "$BUILD/.build-tag"
    fi
    echo "$BUILD/bin"
fi
