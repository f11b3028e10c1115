"""The importance matrix as ``llama_model_quantize`` takes it (llama-cpp-python ctypes).

``llama_model_quantize_params.imatrix`` points at an array of ``llama_model_imatrix_data``
(name, float pointer, length) ended by an entry whose name is NULL. The floats are the
MEAN squared activation per input column (Σx²/count), not the raw sums of the file, and
libllama does not record where they came from: the ``quantize.imatrix.*`` keys that
``llama-quantize`` writes must be passed as key/value overrides by the caller
(``imatrix_kv_overrides``).

Usage (in the libllama wrapper)::

    check_imatrix_fits(imatrix_means(imatrix), row_lengths, imatrix_path, source)
    array, keepalive = imatrix_param_array(imatrix)
    params.imatrix = array            # keep ``keepalive`` referenced until quantize returns
    kv, kv_keep = kv_override_array(imatrix_kv_overrides(imatrix, path))
    params.kv_overrides = kv
"""
from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from quantmill.errors import InputFileError
from quantmill.llama_lib import binding
from quantmill.quantize.gguf.imatrix import Imatrix, imatrix_means, read_imatrix

KV_IMATRIX_FILE = "quantize.imatrix.file"
KV_IMATRIX_DATASET = "quantize.imatrix.dataset"
KV_IMATRIX_N_ENTRIES = "quantize.imatrix.entries_count"
KV_IMATRIX_N_CHUNKS = "quantize.imatrix.chunks_count"
KV_STR_MAX = 127  # llama_model_kv_override.val_str is char[128]


def imatrix_param_array(imatrix: Imatrix | Mapping[str, np.ndarray] | Path | str) -> tuple[Any, list[Any]]:
    """A pointer for ``params.imatrix`` and the objects that must outlive the quantize call.

    ``imatrix`` is an ``Imatrix``, the path of an imatrix GGUF, or a ready mapping of GGUF
    weight name -> mean squared activation per input column.
    """
    llama_cpp = binding()
    means = imatrix_means(imatrix)
    table = (llama_cpp.llama_model_imatrix_data * (len(means) + 1))()
    keepalive: list[Any] = [table]
    for i, (name, values) in enumerate(means.items()):
        data = np.ascontiguousarray(values, dtype=np.float32)
        encoded = name.encode("utf-8")
        keepalive.extend((data, encoded))
        table[i].name = encoded
        table[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        table[i].size = data.size
    table[len(means)].name = None  # terminator: libllama stops at the first NULL name
    table[len(means)].size = 0
    return ctypes.cast(table, ctypes.POINTER(llama_cpp.llama_model_imatrix_data)), keepalive


def check_imatrix_fits(
    means: Mapping[str, np.ndarray], row_lengths: Mapping[str, int], imatrix_path: str | Path, model_path: str | Path
) -> None:
    """Raise a one-line error when the imatrix was made for another model than ``model_path``.

    ``row_lengths`` maps the model's 2-D weight names to their row length (ne[0]). libllama
    would otherwise abort mid-file on the first tensor whose imatrix length differs.
    """
    shared = sorted(set(means) & set(row_lengths))
    if not shared:
        raise InputFileError(
            imatrix_path, f"has no entry for any weight of {model_path} (e.g. {next(iter(sorted(row_lengths)), '?')!r})",
            "make the imatrix from this model with `quantmill calibrate`",
        )
    for name in shared:
        size = int(np.asarray(means[name]).size)
        if size % row_lengths[name]:
            raise InputFileError(
                imatrix_path, f"entry {name} has {size} values but the tensor's rows in {model_path} have {row_lengths[name]}",
                "make the imatrix from this model with `quantmill calibrate`",
            )


def imatrix_kv_overrides(imatrix: Imatrix | Path | str, file_name: str | Path | None = None) -> list[tuple[str, int | str]]:
    """The ``quantize.imatrix.*`` keys llama-quantize records, for the quantized GGUF."""
    if isinstance(imatrix, (str, Path)):
        file_name = file_name if file_name is not None else imatrix
        imatrix = read_imatrix(Path(imatrix))
    items: list[tuple[str, int | str]] = []
    if file_name is not None:
        items.append((KV_IMATRIX_FILE, str(file_name)))
    if imatrix.datasets:
        items.append((KV_IMATRIX_DATASET, imatrix.datasets[0]))
    items.append((KV_IMATRIX_N_ENTRIES, len(imatrix.entries)))
    if imatrix.chunk_count > 0:
        items.append((KV_IMATRIX_N_CHUNKS, imatrix.chunk_count))
    return items


def kv_override_array(items: Sequence[tuple[str, int | str]]) -> tuple[Any, list[Any]]:
    """``llama_model_kv_override`` array (int and string values), ended by an empty key."""
    llama_cpp = binding()
    table = (llama_cpp.llama_model_kv_override * (len(items) + 1))()
    for i, (key, value) in enumerate(items):
        raw_key, entry = key.encode("utf-8"), cast(Any, table[i])  # the binding types a union field loosely
        if len(raw_key) > KV_STR_MAX:
            raise ValueError(f"kv override key {key!r} is longer than {KV_STR_MAX} bytes")
        entry.key = raw_key
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise TypeError(f"kv override {key!r}: only int and str values are supported")
        if isinstance(value, int):
            entry.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            entry.value.val_i64 = value
        else:
            entry.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            entry.value.val_str = value.encode("utf-8")[:KV_STR_MAX]  # truncated as llama-quantize does
    table[len(items)].key = b""  # terminator: an empty key
    return ctypes.cast(table, ctypes.POINTER(llama_cpp.llama_model_kv_override)), [table]
