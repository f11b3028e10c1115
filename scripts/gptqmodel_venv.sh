#!/usr/bin/env bash
# The GPTQModel 7.6 peer in its own virtualenv (never a dependency of quantmill): the GPTQ loader
# test (tests/quantize/test_gptq_gptqmodel.py) and benchmarks/bench_gptq.py run it as a subprocess.
# Created under ~/.cache/quantmill/gptqmodel-venv (or $QUANTMILL_GPTQMODEL_VENV) when missing,
# with pinned versions; idempotent (a marker file records the pins once everything installed);
# pip's wheel cache makes a re-creation fast. Prints the venv's python on stdout, so that
# callers can `export QUANTMILL_GPTQMODEL_PYTHON=$(bash scripts/gptqmodel_venv.sh)`.
set -euo pipefail
VENV=${QUANTMILL_GPTQMODEL_VENV:-$HOME/.cache/quantmill/gptqmodel-venv}
PINS="torch==2.13.0 gptqmodel==7.6.0 optimum==2.3.0"
source "$(dirname "$0")/pinned_venv.sh"
pinned_venv "$VENV" "$PINS" && exit 0
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" >&2; }
# torch first and pinned, so that GPTQModel's requirements cannot pull a multi-GB CUDA build.
pip install torch==2.13.0
# optimum: transformers' GPTQ loader. GPTQModel 7.6 builds from its sdist once (cached wheel afterwards).
pip install torch==2.13.0 gptqmodel==7.6.0 optimum==2.3.0
"$VENV/bin/python" -c "import gptqmodel, optimum, torch; assert torch.__version__.startswith('2.13.0')" >&2
pinned_venv_done "$VENV" "$PINS"
