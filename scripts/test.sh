#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set up, fetch and build llama.cpp's reference
# source and tools (the peers the parity tests compare against: convert_hf_to_gguf.py,
# llama-quantize, llama-imatrix; cached, so only the first run builds), create the GPTQModel
# peer venv (scripts/gptqmodel_venv.sh), install git-lfs and the giftless LFS server venv
# (scripts/lfs_server.sh), install the Ray extra, run ruff, mypy (scripts/typecheck.sh) and pytest.
# Extra arguments go to pytest (e.g. `-m "not slow"` for the fast tests only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the optional Ray executor (pyproject's `ray` extra): tests/pipeline/test_ray_executor.py runs a two-node cluster
.venv/bin/python -m pip --disable-pip-version-check -q install -e '.[dev,ray]'
bash scripts/llama_cpp_source.sh --build > /dev/null
# GPTQModel 7.6, the GPTQ peer, in its own venv (tests/quantize/test_gptq_gptqmodel.py fails, not skips, when set)
QUANTMILL_GPTQMODEL_PYTHON=${QUANTMILL_GPTQMODEL_PYTHON:-$(bash scripts/gptqmodel_venv.sh)}
export QUANTMILL_GPTQMODEL_PYTHON
# git-lfs (Debian's) and giftless 0.6.2, the real LFS server of tests/publish/test_publish_lfs.py, in its own venv
# (scripts/lfs_server.sh); with CI set, that test fails, not skips, when either is missing.
if ! command -v git-lfs > /dev/null; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq git-lfs > /dev/null
fi
QUANTMILL_GIFTLESS_PYTHON=${QUANTMILL_GIFTLESS_PYTHON:-$(bash scripts/lfs_server.sh)}
export QUANTMILL_GIFTLESS_PYTHON
# lint and types first (seconds to a minute): the configuration is pyproject.toml's
.venv/bin/ruff check .
bash scripts/typecheck.sh
exec .venv/bin/python -m pytest "$@"
