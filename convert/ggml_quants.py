"""ggml's own row quantizers (``ggml_quantize_chunk`` in the libggml that llama-cpp-python ships).

``gguf.quants`` re-implements ggml's reference quantizers in numpy, bit for bit but slowly
(a dozen full passes over each block). The C originals give the same bytes several times
faster and release the GIL, so the converter's worker threads run them in parallel. Types
listed in :data:`NATIVE_TYPES` go through ggml; anything else, or a machine where libggml
cannot be loaded, falls back to ``gguf.quants``. float16 rows are widened by ggml's SIMD row
conversion too (numpy's cast is the slowest step of an f16 → bf16/q8_0 conversion).
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import gguf
import numpy as np

from quantmill.convert.safetensors_io import to_float32

Q = gguf.GGMLQuantizationType
# Types whose ggml_quantize_chunk needs no importance matrix and no lookup tables.
NATIVE_TYPES = frozenset({Q.Q8_0, Q.BF16})


@functools.cache
def _library(name: str) -> ctypes.CDLL | None:
    try:
        import llama_cpp

        return ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / name))
    except (ImportError, OSError):
        return None


@functools.cache
def _fp16_to_fp32() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    lib = _library("libggml-cpu.so")
    if lib is None:
        return None
    lib.ggml_cpu_init()  # fills the fp16 table its scalar path reads on CPUs without F16C
    fn = lib.ggml_cpu_fp16_to_fp32
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return fn


def widen_rows(rows: np.ndarray, dtype: str) -> np.ndarray:
    """Stored rows (safetensors ``dtype``) → float32, exactly; float16 by ggml's SIMD row conversion (numpy's is slower)."""
    fn = _fp16_to_fp32() if dtype == "F16" else None
    if fn is None:
        return to_float32(rows, dtype)
    src = np.ascontiguousarray(rows)
    out = np.empty(src.shape, dtype=np.float32)
    fn(src.ctypes.data, out.ctypes.data, src.size)
    return out


@functools.cache
def _quantize_chunk() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    lib = _library("libggml-base.so")
    if lib is None:
        return None
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    return fn


def quantize(data: np.ndarray, qtype: Q) -> np.ndarray:
    """``data`` (float32, rows in the last axis) → the bytes of ``qtype``, exactly as ``gguf.quants.quantize``."""
    fn = _quantize_chunk() if qtype in NATIVE_TYPES else None
    if fn is None:
        return gguf.quants.quantize(data, qtype)
    rows = np.ascontiguousarray(data, dtype=np.float32)
    n_per_row = rows.shape[-1]
    n_rows = rows.size // n_per_row if n_per_row else 0
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if n_per_row % block_size:
        raise ValueError(f"row length {n_per_row} is not a multiple of {qtype.name}'s block size {block_size}")
    out = np.empty((*rows.shape[:-1], n_per_row // block_size * type_size), dtype=np.uint8)
    written = fn(int(qtype), rows.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row, None)
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out
