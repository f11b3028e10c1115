#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set up, fetch and build llama.cpp's reference
# source and tools (the peers the parity tests compare against: convert_hf_to_gguf.py,
# llama-quantize, llama-imatrix; cached, so only the first run builds), run pytest.
# Extra arguments go to pytest (e.g. `-m "not slow"` for the fast tests only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/llama_cpp_source.sh --build > /dev/null
exec .venv/bin/python -m pytest "$@"
