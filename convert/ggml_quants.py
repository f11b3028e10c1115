"""ggml's own row conversions and quantizers (the libggml that llama-cpp-python ships), through ctypes.

``gguf.quants`` re-implements ggml's reference quantizers in numpy, bit for bit but slowly
(a dozen full passes over each block). The C originals give the same bytes several times
faster and release the GIL, so the converter's worker threads run them in parallel. Types
listed in :data:`NATIVE_TYPES` go through ggml; anything else falls back to ``gguf.quants``.

:func:`encode` streams stored rows through a small per-thread float32 scratch, a span of
:data:`SPAN` values at a time: ggml widens the span (float16 and bfloat16 by its SIMD row
conversion; float32 is read in place), the caller's check sees it, and ggml encodes it into
the output, all while the span is in the core's cache. The bytes are those of
``gguf.quants.quantize(widened, qtype)``; only the number of passes over memory changes.
"""
from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Callable

import gguf
import numpy as np

from quantmill.convert.safetensors_io import DTYPES, to_float32
from quantmill.llama_lib import c_function

Q = gguf.GGMLQuantizationType
# Types whose ggml routine needs no importance matrix and no lookup tables.
NATIVE_TYPES = frozenset({Q.Q8_0, Q.BF16})
# float32 values widened, checked and encoded at a time: 512 KiB of scratch, about a core's L2 cache
# (measured: smaller spans spend more on per-span calls than they gain in cache). A multiple of
# every block size, so each span holds whole blocks.
SPAN = 1 << 17
# A C routine (source address, destination address, number of values) that returns nothing.
RowFn = Callable[[int, int, int], None]
_local = threading.local()


@functools.cache
def _row_fn(symbol: str) -> RowFn:
    """A ggml row routine (libggml-cpu, reached through libllama, which links it)."""
    if symbol.startswith("ggml_cpu_"):
        _cpu_init()
    return c_function(symbol, None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


@functools.cache
def _cpu_init() -> None:
    c_function("ggml_cpu_init", None)()  # fills the fp16 table its scalar path reads on CPUs without F16C


@functools.cache
def _widener(dtype: str) -> RowFn | None:
    """ggml's exact widening of stored ``dtype`` values to float32, or None."""
    symbol = {"F16": "ggml_cpu_fp16_to_fp32", "BF16": "ggml_cpu_bf16_to_fp32"}.get(dtype)
    return _row_fn(symbol) if symbol else None


@functools.cache
def _quantize_chunk() -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    i64 = ctypes.c_int64
    return c_function("ggml_quantize_chunk", ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, i64, i64, i64,
                      ctypes.c_void_p)


@functools.cache
def _encoder(qtype: Q) -> RowFn | None:
    """ggml's float32 → ``qtype`` routine over a run of whole blocks, or None.

    BF16 uses the CPU backend's row conversion: the same rounding as ``ggml_quantize_chunk``'s
    reference one (both are ``ggml_compute_fp32_to_bf16``), compiled for this CPU.
    """
    if qtype == Q.BF16:
        return _row_fn("ggml_cpu_fp32_to_bf16")
    if qtype not in NATIVE_TYPES:
        return None
    chunk = _quantize_chunk()
    # Blocks are independent, so a run of values is quantized as one row of that length.
    return lambda src, dst, n: chunk(int(qtype), src, dst, 0, 1, n, None)


def _out_shape(shape: tuple[int, ...], qtype: Q) -> tuple[int, ...]:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_per_row = shape[-1] if shape else 1
    if n_per_row % block_size:
        raise ValueError(f"row length {n_per_row} is not a multiple of {qtype.name}'s block size {block_size}")
    return (*shape[:-1], n_per_row // block_size * type_size)


def widen_rows(rows: np.ndarray, dtype: str) -> np.ndarray:
    """Stored rows (safetensors ``dtype``) → float32, exactly; float16 and bfloat16 by ggml's SIMD row conversion."""
    fn = _widener(dtype)
    if fn is None:
        return to_float32(rows, dtype)
    src = np.ascontiguousarray(rows)
    out = np.empty(src.shape, dtype=np.float32)
    fn(src.ctypes.data, out.ctypes.data, src.size)
    return out


def quantize(data: np.ndarray, qtype: Q) -> np.ndarray:
    """``data`` (float32, rows in the last axis) → the bytes of ``qtype``, exactly as ``gguf.quants.quantize``."""
    return encode(np.asarray(data, dtype=np.float32), "F32", qtype)


def encode(rows: np.ndarray, dtype: str, qtype: Q, check: Callable[[np.ndarray], None] | None = None,
           out: np.ndarray | None = None) -> np.ndarray:
    """Stored rows (safetensors ``dtype``, rows in the last axis) → the bytes of ``qtype`` (uint8 rows).

    ``check`` sees every widened float32 value, a span at a time, before that span is encoded
    (it raises to stop). ``out``, a uint8 array of at least the result's size, receives the
    bytes instead of a new array; the result is then a view of it.
    """
    encoder = _encoder(qtype)
    widener = _widener(dtype) if dtype != "F32" else None
    if encoder is None or (widener is None and dtype != "F32"):
        widened = widen_rows(rows, dtype)
        if check is not None:
            check(widened)
        return gguf.quants.quantize(widened, qtype)
    shape = _out_shape(rows.shape, qtype)
    nbytes = int(np.prod(shape, dtype=np.int64))
    result = (np.empty(nbytes, np.uint8) if out is None else out.reshape(-1)[:nbytes]).reshape(shape)
    src = np.ascontiguousarray(rows).reshape(-1)
    if src.dtype != DTYPES[dtype][0]:
        raise ValueError(f"rows of dtype {src.dtype} are not stored {dtype} values")
    if src.size == 0:
        return result
    # Addresses are taken once: ``.ctypes.data`` on every span would cost more than converting it.
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    src_addr, dst_addr, itemsize = src.ctypes.data, result.ctypes.data, src.itemsize
    scratch = _scratch() if widener is not None else None
    scratch_addr = scratch.ctypes.data if scratch is not None else 0
    for start in range(0, src.size, SPAN):
        count = min(SPAN, src.size - start)
        if widener is not None:
            assert scratch is not None
            widener(src_addr + start * itemsize, scratch_addr, count)
            values, values_addr = (scratch if count == SPAN else scratch[:count]), scratch_addr
        else:
            values, values_addr = src[start:start + count], src_addr + start * itemsize
        if check is not None:
            check(values)
        encoder(values_addr, dst_addr + start // block_size * type_size, count)
    return result


def _scratch() -> np.ndarray:
    """This thread's float32 scratch span (the converter's worker threads each widen into their own)."""
    scratch: np.ndarray | None = getattr(_local, "scratch", None)
    if scratch is None:
        scratch = _local.scratch = np.empty(SPAN, np.float32)
    return scratch
