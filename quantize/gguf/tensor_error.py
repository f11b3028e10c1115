"""What one weight tensor loses at one ggml type, measured with libggml's own quantizer.

    error = quantization_error(weights, ggml_type("Q4_K"), importance)   # Σ_ij a_j · (w_ij − q_ij)²

``weights`` is (rows, n_per_row) float32: one row is what one output of the matmul reads, as in
ggml (a GGUF tensor's numpy view). The rows are quantized by ``ggml_quantize_chunk`` with the
importance matrix ``importance`` (the tensor's per-column means, as libllama passes them), which
is the call libllama's quantizer makes for that tensor; gguf-py's ``dequantize`` reads the
blocks back. ``a`` weights the squared error by each input column's mean x², so the error is
the expected squared change of the matmul's output per token, Σ_i E[(Δw_i · x)²], without the
cross terms: what the imatrix-guided quantizers minimise.

Large tensors are measured on evenly spaced rows (``max_rows``) and the error scaled to all rows:
a row's error depends only on that row. Rows are quantized in parallel chunks; the C call
releases the GIL.
"""
from __future__ import annotations

import ctypes
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from quantmill.llama_lib import c_function

if TYPE_CHECKING:
    from quantmill.quantize.gguf.types import GGMLType

ROWS_PER_CHUNK = 64


@functools.cache
def _quantize_chunk() -> Any:
    return c_function("ggml_quantize_chunk", ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                      ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)


def row_bytes(tensor_type: GGMLType, n_per_row: int) -> int:
    """Bytes of one row of ``n_per_row`` weights at ``tensor_type`` (``n_per_row`` a multiple of its block)."""
    return n_per_row // tensor_type.block_size * tensor_type.type_size


def fits(tensor_type: GGMLType, n_per_row: int) -> bool:
    """Whether rows of ``n_per_row`` weights can be stored at ``tensor_type`` (whole blocks) without a fallback."""
    return n_per_row % tensor_type.block_size == 0


def quantize_rows(weights: np.ndarray, tensor_type: GGMLType, importance: np.ndarray | None, threads: int = 1) -> np.ndarray:
    """The ggml blocks of ``weights`` (rows, n_per_row) at ``tensor_type``: (rows, row bytes) uint8."""
    rows, n_per_row = weights.shape
    src = np.ascontiguousarray(weights, dtype=np.float32)
    out = np.empty((rows, row_bytes(tensor_type, n_per_row)), dtype=np.uint8)
    imatrix = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    if imatrix is not None and imatrix.shape != (n_per_row,):
        raise ValueError(f"importance has {imatrix.shape} values for rows of {n_per_row}")
    call = _quantize_chunk()

    def chunk(start: int) -> None:
        stop = min(start + ROWS_PER_CHUNK, rows)
        part = src[start:stop]
        call(tensor_type.value, part.ctypes.data, out[start:stop].ctypes.data, 0, stop - start, n_per_row,
             None if imatrix is None else imatrix.ctypes.data)

    starts = range(0, rows, ROWS_PER_CHUNK)
    if threads > 1 and rows > ROWS_PER_CHUNK:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(chunk, starts))
    else:
        for start in starts:
            chunk(start)
    return out


def dequantize_rows(blocks: np.ndarray, tensor_type: GGMLType) -> np.ndarray:
    """gguf-py's reading of ggml blocks (rows, row bytes) back into float32 (rows, n_per_row)."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    return np.asarray(dequantize(blocks, GGMLQuantizationType(tensor_type.value)), dtype=np.float32)


def sampled_rows(rows: int, max_rows: int | None) -> np.ndarray:
    """Evenly spaced row indices (all rows when ``max_rows`` is None or not smaller)."""
    if max_rows is None or rows <= max_rows:
        return np.arange(rows)
    return np.unique(np.linspace(0, rows - 1, max_rows).round().astype(np.int64))


def quantization_error(weights: np.ndarray, tensor_type: GGMLType, importance: np.ndarray | None,
                       threads: int = 1) -> float:
    """Σ_ij a_j (w_ij − q_ij)² over ``weights`` (rows, n_per_row); ``a`` is ``importance`` or 1."""
    blocks = quantize_rows(weights, tensor_type, importance, threads)
    diff = dequantize_rows(blocks, tensor_type) - weights
    np.square(diff, out=diff)
    per_column = diff.sum(axis=0, dtype=np.float64)
    return float(per_column @ (importance.astype(np.float64) if importance is not None else np.ones_like(per_column)))
