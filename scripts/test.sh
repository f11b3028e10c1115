#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set up, fetch llama.cpp's reference source (its
# convert_hf_to_gguf.py is the peer the converter-parity tests compare against), run pytest.
# Extra arguments go to pytest (e.g. `-m "not slow"` for the fast tests only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export QUANTMILL_LLAMA_CPP_DIR=${QUANTMILL_LLAMA_CPP_DIR:-$PWD/.cache/llama.cpp}
bash scripts/llama_cpp_source.sh > /dev/null
exec .venv/bin/python -m pytest "$@"
