#!/usr/bin/env bash
# Prepare what benchmarks/gpu_check.sh needs on a lent GPU machine (no network; Python 3.12, torch 2.11 cu130 and
# transformers there, see the device tool's KINDS.md) in .gpu/ (git-ignored through .git/info/exclude): the wheels of
# quantmill's dependencies that machine lacks, the CUDA llama-cpp-python wheel (scripts/llama_cpp_cuda_wheel.sh), a
# GPTQModel 7.6 wheel built here without its CUDA kernels (its GPTQ pass is plain torch) and SmolLM2's tokenizer files
# (the bundled model itself, 85 MB, is over what one device call may carry). Prints the folder's size.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/whl
get() {
    python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu/whl "$@"
}
# quantmill's requirements missing there (pyproject.toml), and GPTQModel's (its METADATA)
get gguf==0.19.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 annotated-doc==0.0.7
get 'torchao>=0.18.0' 'datasets>=3.6.0' 'dill>=0.3.8' multiprocess
# sdists only on PyPI: the pure-Python ones become wheels here; pypcre (C) is built there (gpu_check.sh)
.venv/bin/python -m pip wheel -q --disable-pip-version-check --no-deps -w .gpu/whl \
    'device-smi>=0.5.7' 'logbar>=0.4.14' 'tokenicer>=0.0.14' 'defuser>=0.0.28'
python3 -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: -d .gpu/sdist 'pypcre>=0.6.2' 
cp "$(bash scripts/llama_cpp_cuda_wheel.sh | tail -1)" .gpu/whl/
BUILD_CUDA_EXT=0 .venv/bin/python -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
    gptqmodel==7.6.0 -w .gpu/whl
.venv/bin/python - <<'PY'
import sys
sys.path.insert(0, "tests")
from conftest import smollm2_gguf_path, write_smollm2_tokenizer
write_smollm2_tokenizer(smollm2_gguf_path(), __import__("pathlib").Path(".gpu/smollm2_tokenizer"))
PY
du -sh .gpu
