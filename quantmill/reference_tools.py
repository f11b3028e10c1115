"""Where llama.cpp's reference source and tools live, for parity tests and benchmarks only.

quantmill never runs these at run time. ``scripts/llama_cpp_source.sh [--build]`` puts the
llama.cpp tree vendored in the pinned llama-cpp-python sdist under the cache directory and
builds llama-perplexity, llama-quantize, llama-imatrix and llama-gguf-split next to it;
``QUANTMILL_LLAMA_CPP_DIR`` and ``QUANTMILL_LLAMA_CPP_BIN`` point elsewhere.
"""
from __future__ import annotations

import os
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"


def _cache_root() -> Path:
    return Path(os.environ.get("QUANTMILL_CACHE") or Path.home() / ".cache" / "quantmill")


def llama_cpp_source_dir() -> Path:
    """llama.cpp's source tree (convert_hf_to_gguf.py, gguf-py/, tools/)."""
    env = os.environ.get("QUANTMILL_LLAMA_CPP_DIR")
    return Path(env) if env else _cache_root() / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


def llama_cpp_bin_dir() -> Path:
    """Where the built llama.cpp tools are."""
    env = os.environ.get("QUANTMILL_LLAMA_CPP_BIN")
    return Path(env) if env else _cache_root() / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}-build" / "bin"


def llama_cpp_tool(name: str) -> Path:
    """Path of the llama.cpp tool ``name`` (it may not exist; callers check)."""
    return llama_cpp_bin_dir() / name
