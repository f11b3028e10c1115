#!/usr/bin/env bash
# Build llama-cpp-python (the pinned version) with llama.cpp's CUDA backend into a wheel cached under
# ~/.cache/quantmill/wheels/llama-cpp-python-<version>-cuda<nvcc major>-sm<archs>, for GPU machines without network:
# carry the wheel there and `pip install --no-deps` it (benchmarks/gpu_check.sh does). Prints the wheel's path.
# Needs nvcc (CUDA 13: /usr/local/cuda or $CUDACXX); cuBLAS, which these machines' toolkit lacks, comes from NVIDIA's
# PyPI wheel (nvidia-cublas) and is linked by its soname, so at run time the GPU machine's own libcublas.so.13
# (torch's nvidia packages) is used: put its directory on LD_LIBRARY_PATH. GGML_CUDA_NO_VMM: no libcuda.so stub here
# to link against (the driver is only on the GPU machine); llama.cpp then uses its plain memory pool.
# Not part of the test suite; about an hour on 2 cores for one architecture.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/llama_cpp_cmake_args.sh
ARCHS=${CUDA_ARCHS:-90}
CUBLAS=${CUBLAS_VERSION:-13.0.0.19}  # the oldest cuBLAS 13: any later libcublas.so.13 runs what it links
NVCC=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
[ -x "$NVCC" ] || { echo "llama_cpp_cuda_wheel.sh: nvcc not found; set CUDACXX to the CUDA 13 compiler" >&2; exit 2; }
MAJOR=$("$NVCC" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
CACHE=${QUANTMILL_CACHE:-$HOME/.cache/quantmill}
WHEELS=$CACHE/wheels/llama-cpp-python-$LLAMA_CPP_VERSION-cuda$MAJOR-sm$ARCHS
if ls "$WHEELS"/llama_cpp_python-*.whl > /dev/null 2>&1; then
    ls "$WHEELS"/llama_cpp_python-*.whl
    exit 0
fi
DEPS=$CACHE/cuda-deps/nvidia-cublas-$CUBLAS
if [ ! -f "$DEPS/.done" ]; then
    rm -rf "$DEPS" && mkdir -p "$DEPS"
    python3 -m pip download -q --disable-pip-version-check --no-deps "nvidia-cublas==$CUBLAS" -d "$DEPS" >&2
    python3 -m zipfile -e "$DEPS"/nvidia_cublas-*.whl "$DEPS/tree"
    rm "$DEPS"/nvidia_cublas-*.whl
    touch "$DEPS/.done"
fi
ROOT=$DEPS/tree/nvidia/cu$MAJOR
for lib in cublas cublasLt; do ln -sf "lib$lib.so.$MAJOR" "$ROOT/lib/lib$lib.so"; done
rm -rf "$WHEELS.part" && mkdir -p "$WHEELS.part"
started=$(date +%s)
# the CPU flags of the default build too (no AMX), so that the CPU part of this wheel runs where the default one does
CMAKE_ARGS="$LLAMA_CPP_CMAKE_ARGS -DGGML_CUDA=on -DGGML_CUDA_NO_VMM=ON -DCMAKE_CUDA_ARCHITECTURES=$ARCHS \
-DCMAKE_CUDA_COMPILER=$NVCC -DCUDA_cublas_LIBRARY=$ROOT/lib/libcublas.so -DCUDA_cublasLt_LIBRARY=$ROOT/lib/libcublasLt.so \
-DCMAKE_CUDA_FLAGS=-I$ROOT/include" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    .venv/bin/python -m pip wheel -q --disable-pip-version-check --no-deps --no-cache-dir --no-binary llama-cpp-python \
    "llama-cpp-python==$LLAMA_CPP_VERSION" -w "$WHEELS.part" >&2
echo "built in $(( $(date +%s) - started )) s: $(du -h "$WHEELS.part"/*.whl | cut -f1)" >&2
rm -rf "$WHEELS" && mv "$WHEELS.part" "$WHEELS"
ls "$WHEELS"/llama_cpp_python-*.whl
