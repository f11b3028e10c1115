"""What a GGUF file really holds: per-tensor types, per-type totals, bits per weight.

The figures come from the file itself, not from the requested quantization type: llama.cpp
swaps K-quants for legacy types on tensors whose rows are not a multiple of 256 values, and
the ``_S``/``_M``/``_L`` mixes upgrade chosen tensors, so only the file tells the truth.
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

from quantmill.convert.gguf_reader import check_gguf_magic
from quantmill.errors import InputFileError
from quantmill.llama_lib import c_function, libllama_log


class TensorInfo(NamedTuple):
    """One tensor as stored: name, ggml type name, shape (ggml order: row length first)."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int

    @property
    def row_length(self) -> int:
        return self.shape[0] if self.shape else 1


class TypeTotals(NamedTuple):
    """All tensors of one ggml type."""

    type_name: str
    n_tensors: int
    n_elements: int
    n_bytes: int

    @property
    def bpw(self) -> float:
        return 8.0 * self.n_bytes / self.n_elements if self.n_elements else 0.0


class GGUFSummary(NamedTuple):
    """A GGUF file's tensors and sizes. ``bpw`` counts tensor data only, as llama.cpp's
    "model size ... (N BPW)" line does; ``file_size`` includes metadata and padding."""

    path: Path
    file_size: int
    file_type: int | None
    tensors: tuple[TensorInfo, ...]
    by_type: dict[str, TypeTotals]
    architecture: str = ""  # general.architecture
    keys: tuple[str, ...] = ()  # every metadata key, in file order
    version: int = 3  # the GGUF format version in the header
    pre_tokenizer: str = ""  # tokenizer.ggml.pre

    def require(self, capability: str) -> None:
        """Refuse a GGUF whose family (its architecture record) cannot go through ``capability``."""
        from quantmill.convert.arch import for_gguf

        for_gguf(self.architecture, self.keys, self.path).require(capability, self.path)

    @property
    def n_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def bpw(self) -> float:
        n = self.n_elements
        return 8.0 * self.tensor_bytes / n if n else 0.0

    def tensor_types(self) -> dict[str, str]:
        """Tensor name → ggml type name, sorted by tensor name."""
        return {t.name: t.type_name for t in sorted(self.tensors, key=lambda t: t.name)}


class _InitParams(ctypes.Structure):
    """``struct gguf_init_params``: metadata only (no tensor data is read, no ggml context made)."""

    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


_GGUF_TYPE_UINT32, _GGUF_TYPE_STRING = 4, 8  # enum gguf_type (gguf.h)
_MAX_DIMS = 4  # GGML_MAX_DIMS


@functools.cache
def _reader() -> SimpleNamespace:
    """ggml's GGUF reader (``gguf.h`` in the libggml llama-cpp-python ships), declared once."""
    p, i64, size = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t
    return SimpleNamespace(
        init=c_function("gguf_init_from_file", p, ctypes.c_char_p, _InitParams),
        free=c_function("gguf_free", None, p),
        version=c_function("gguf_get_version", ctypes.c_uint32, p),
        n_kv=c_function("gguf_get_n_kv", i64, p),
        key=c_function("gguf_get_key", ctypes.c_char_p, p, i64),
        kv_type=c_function("gguf_get_kv_type", ctypes.c_int, p, i64),
        val_u32=c_function("gguf_get_val_u32", ctypes.c_uint32, p, i64),
        val_str=c_function("gguf_get_val_str", ctypes.c_char_p, p, i64),
        n_tensors=c_function("gguf_get_n_tensors", i64, p),
        tensor_name=c_function("gguf_get_tensor_name", ctypes.c_char_p, p, i64),
        tensor_type=c_function("gguf_get_tensor_type", ctypes.c_int, p, i64),
        tensor_ne=c_function("gguf_get_tensor_ne", ctypes.POINTER(i64), p, i64),
        tensor_size=c_function("gguf_get_tensor_size", size, p, i64),
        tensor_offset=c_function("gguf_get_tensor_offset", size, p, i64),
        data_offset=c_function("gguf_get_data_offset", size, p),
        type_name=c_function("ggml_type_name", ctypes.c_char_p, ctypes.c_int),
    )


def summarize_gguf(path: str | Path) -> GGUFSummary:
    """``path``'s metadata keys and tensor table, read by ggml's own GGUF reader (no tensor data is read).

    A tensor's shape is ggml's: ``ne`` with trailing 1s dropped (at least one dimension), row length first.
    """
    path = Path(path)
    check_gguf_magic(path)
    c = _reader()
    with libllama_log() as log:
        ctx = c.init(os.fsencode(path), _InitParams(True, None))
    if not ctx:
        raise InputFileError(path, f"malformed GGUF ({log.error_summary()})", "re-create the file")
    try:
        keys = tuple(c.key(ctx, k).decode("utf-8", errors="replace") for k in range(c.n_kv(ctx)))
        values = {key: k for k, key in enumerate(keys)}
        file_type = values.get("general.file_type")
        text = {key: c.val_str(ctx, k).decode("utf-8", errors="replace") for key in ("general.architecture", "tokenizer.ggml.pre")
                if (k := values.get(key)) is not None and c.kv_type(ctx, k) == _GGUF_TYPE_STRING}
        tensors = tuple(_tensor(c, ctx, t) for t in range(c.n_tensors(ctx)))
        file_size = path.stat().st_size
        data_end = max((c.data_offset(ctx) + c.tensor_offset(ctx, t) + tensors[t].n_bytes for t in range(len(tensors))), default=0)
        if data_end > file_size:
            raise InputFileError(path, f"truncated: its tensor data ends at byte {data_end:,}, the file has {file_size:,}",
                                 "re-create or re-download the file")
        return GGUFSummary(
            path=path,
            file_size=file_size,
            file_type=int(c.val_u32(ctx, file_type)) if file_type is not None and c.kv_type(ctx, file_type) == _GGUF_TYPE_UINT32 else None,
            tensors=tensors,
            by_type=_totals_by_type(tensors),
            architecture=text.get("general.architecture", ""),
            keys=keys,
            version=int(c.version(ctx)),
            pre_tokenizer=text.get("tokenizer.ggml.pre", ""),
        )
    finally:
        c.free(ctx)


def _tensor(c: SimpleNamespace, ctx: int, t: int) -> TensorInfo:
    ne = c.tensor_ne(ctx, t)[:_MAX_DIMS]
    while len(ne) > 1 and ne[-1] == 1:
        ne.pop()
    return TensorInfo(
        name=c.tensor_name(ctx, t).decode("utf-8", errors="replace"),
        type_name=c.type_name(c.tensor_type(ctx, t)).decode().upper(),
        shape=tuple(int(d) for d in ne),
        n_elements=math.prod(ne),
        n_bytes=int(c.tensor_size(ctx, t)),
    )


def _totals_by_type(tensors: tuple[TensorInfo, ...]) -> dict[str, TypeTotals]:
    acc: dict[str, list[int]] = {}
    for t in tensors:
        entry = acc.setdefault(t.type_name, [0, 0, 0])
        entry[0] += 1
        entry[1] += t.n_elements
        entry[2] += t.n_bytes
    return {name: TypeTotals(name, *acc[name]) for name in sorted(acc)}


def format_summary(summary: GGUFSummary) -> str:
    """A short markdown table of per-type totals plus the file's overall figures."""
    lines = ["| type | tensors | weights | MiB | bpw |", "|---|---:|---:|---:|---:|"]
    for totals in summary.by_type.values():
        lines.append(f"| {totals.type_name} | {totals.n_tensors} | {totals.n_elements:,} "
                     f"| {totals.n_bytes / 2**20:.2f} | {totals.bpw:.3f} |")
    lines.append(f"| **all** | {len(summary.tensors)} | {summary.n_elements:,} "
                 f"| {summary.tensor_bytes / 2**20:.2f} | {summary.bpw:.3f} |")
    return "\n".join(lines)
