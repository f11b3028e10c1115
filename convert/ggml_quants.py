"""ggml's own row quantizers (``ggml_quantize_chunk`` in the libggml that llama-cpp-python ships).

``gguf.quants`` re-implements ggml's reference quantizers in numpy, bit for bit but slowly
(a dozen full passes over each block). The C originals give the same bytes several times
faster and release the GIL, so the converter's worker threads run them in parallel. Types
listed in :data:`NATIVE_TYPES` go through ggml; anything else, or a machine where libggml
cannot be loaded, falls back to ``gguf.quants``.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
# Types whose ggml_quantize_chunk needs no importance matrix and no lookup tables.
NATIVE_TYPES = frozenset({Q.Q8_0})


@functools.cache
def _quantize_chunk() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        import llama_cpp

        lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    except (ImportError, OSError):
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
