#!/usr/bin/env bash
# Sourced by setup.sh and llama_cpp_source.sh: the llama-cpp-python version quantmill pins (pyproject.toml says the
# same), the CMake arguments llama.cpp is built with (the wheel's libllama and the reference tools alike), and a tag
# naming them: the cached builds are keyed by it, so a change of flags rebuilds them.
# Native code for this CPU, but without AMX: on virtual machines whose CPU advertises AMX (cpuid amx_tile) while the
# hypervisor leaves the tile state disabled, ggml's AMX kernels die on their first tile instruction (SIGILL in
# tinygemm_kernel_amx, seen on an Intel Xeon VM). Explicit -mno-amx-* flags win over -march=native in GCC and Clang.
LLAMA_CPP_VERSION=0.3.36
LLAMA_CPP_CMAKE=(-DGGML_NATIVE=ON)
if [ "$(uname -m)" = x86_64 ]; then
    NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    LLAMA_CPP_CMAKE+=("-DCMAKE_C_FLAGS=$NO_AMX" "-DCMAKE_CXX_FLAGS=$NO_AMX")
fi
LLAMA_CPP_BUILD_TAG=native-noamx-1
# the same arguments as one string, for llama-cpp-python's build (scikit-build-core splits CMAKE_ARGS like a shell)
LLAMA_CPP_CMAKE_ARGS=$(printf '%q ' "${LLAMA_CPP_CMAKE[@]}")
