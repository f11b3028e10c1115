#!/usr/bin/env bash
# The GPTQModel 7.6 peer in its own virtualenv (never a dependency of quantmill): the GPTQ loader
# test (tests/quantize/test_gptq_gptqmodel.py) and benchmarks/bench_gptq.py run it as a subprocess.
# Created under ~/.cache/quantmill/gptqmodel-venv (or $QUANTMILL_GPTQMODEL_VENV) when missing,
# with pinned versions; idempotent (a marker file records the pins once everything installed);
# pip's wheel cache makes a re-creation fast. Prints the venv's python on stdout, so that
# callers can `export QUANTMILL_GPTQMODEL_PYTHON=$(bash scripts/gptqmodel_venv.sh)`.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${QUANTMILL_GPTQMODEL_VENV:-$HOME/.cache/quantmill/gptqmodel-venv}
PINS="torch==2.13.0 gptqmodel==7.6.0 optimum==2.3.0"
MARKER="$VENV/.quantmill-pins"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$MARKER" 2>/dev/null)" = "$PINS" ]; then
    echo "$VENV/bin/python"
    exit 0
fi
mkdir -p "$(dirname "$VENV")"
rm -f "$MARKER"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" >&2; }
# torch first and pinned, so that GPTQModel's requirements cannot pull a multi-GB CUDA build.
pip install torch==2.13.0
# optimum: transformers' GPTQ loader. GPTQModel 7.6 builds from its sdist once (cached wheel afterwards).
pip install torch==2.13.0 gptqmodel==7.6.0 optimum==2.3.0
"$VENV/bin/python" -c "import gptqmodel, optimum, torch; assert torch.__version__.startswith('2.13.0')" >&2
echo "$PINS" > "$MARKER"
echo "$VENV/bin/python"
