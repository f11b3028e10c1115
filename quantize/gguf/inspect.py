"""What a GGUF file really holds: per-tensor types, per-type totals, bits per weight.

The figures come from the file itself, not from the requested quantization type: llama.cpp
swaps K-quants for legacy types on tensors whose rows are not a multiple of 256 values, and
the ``_S``/``_M``/``_L`` mixes upgrade chosen tensors, so only the file tells the truth.
"""
from __future__ import annotations

import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType

from quantmill.errors import InputFileError

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as stored: name, ggml type name, shape (ggml order: row length first)."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int

    @property
    def row_length(self) -> int:
        return self.shape[0] if self.shape else 1


@dataclass(frozen=True)
class TypeTotals:
    """All tensors of one ggml type."""

    type_name: str
    n_tensors: int
    n_elements: int
    n_bytes: int

    @property
    def bpw(self) -> float:
        return 8.0 * self.n_bytes / self.n_elements if self.n_elements else 0.0


@dataclass(frozen=True)
class GGUFSummary:
    """A GGUF file's tensors and sizes. ``bpw`` counts tensor data only, as llama.cpp's
    "model size ... (N BPW)" line does; ``file_size`` includes metadata and padding."""

    path: Path
    file_size: int
    file_type: int | None
    tensors: tuple[TensorInfo, ...]
    by_type: dict[str, TypeTotals] = field(default_factory=dict)
    architecture: str = ""  # general.architecture
    keys: tuple[str, ...] = ()  # every metadata key, in file order

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


def check_gguf_magic(path: Path) -> None:
    """Raise InputFileError unless ``path`` is a readable file that starts with the GGUF magic."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "no such file", "give the path of an existing .gguf file")
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise InputFileError(path, f"cannot be read ({exc.strerror})", "check its permissions") from exc
    if magic != GGUF_MAGIC:
        raise InputFileError(path, "not a GGUF file (bad magic)", "give a .gguf model file")


class _TableReader(GGUFReader):
    """gguf-py's reader (gguf==0.19.0, pinned) keeping each metadata array as ONE byte block: the library
    makes a numpy view per element, about 4 s for a 49k vocabulary. An array is only walked to its end
    here; the rest is the library's own parser. Nothing here reads an array's ``contents()``. The file map
    is kept as a plain view of the np.memmap, which runs Python code on each of the parser's thousands of slices."""

    data = property(lambda self: self._map, lambda self, value: setattr(self, "_map", value.view(np.ndarray)))

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[Any], list[int], list[Any]]:
        item = GGUFValueType(int(self._get(orig_offs, np.uint32)[0])) if raw_type == GGUFValueType.ARRAY else None
        if item is None or item == GGUFValueType.ARRAY:  # scalars, strings, nested arrays: the library's way
            return super()._get_field_parts(orig_offs, raw_type)
        end, count = orig_offs + 12, int(self._get(orig_offs + 4, np.uint64)[0])
        if item == GGUFValueType.STRING:
            length = struct.Struct("<Q" if (self.byte_order == "I") == (sys.byteorder == "little") else ">Q")
            view = memoryview(self.data)
            try:
                for _ in range(count):
                    end += 8 + length.unpack_from(view, end)[0]
            except struct.error as exc:
                raise ValueError(f"string array at byte {orig_offs} runs past the end of the file") from exc
        else:
            end += count * np.dtype(self.gguf_scalar_to_np[item]).itemsize
        if end > self.data.size:
            raise ValueError(f"array at byte {orig_offs} runs past the end of the file")
        return end - orig_offs, [self._get(orig_offs, np.uint8, end - orig_offs)], [], [GGUFValueType.ARRAY, item]


def read_gguf(path: str | Path) -> tuple[GGUFSummary, Any]:
    """``path``'s summary and its memory-mapped reader (whose ``tensors`` give the data), read once."""
    path = Path(path)
    check_gguf_magic(path)
    try:
        reader = _TableReader(path, "r")
    except (ValueError, OSError, IndexError, KeyError, OverflowError) as exc:
        raise InputFileError(path, f"malformed GGUF ({exc})", "re-create the file") from exc
    tensors = tuple(
        TensorInfo(t.name, t.tensor_type.name, tuple(int(d) for d in t.shape), int(t.n_elements), int(t.n_bytes))
        for t in reader.tensors
    )
    file_type, arch = reader.fields.get("general.file_type"), reader.fields.get("general.architecture")
    summary = GGUFSummary(
        path=path,
        file_size=path.stat().st_size,
        file_type=int(file_type.contents()) if file_type is not None else None,
        tensors=tensors,
        by_type=_totals_by_type(tensors),
        architecture=str(arch.contents()) if arch is not None else "",
        keys=tuple(k for k in reader.fields if not k.startswith("GGUF.")),
    )
    return summary, reader


def summarize_gguf(path: str | Path) -> GGUFSummary:
    """Read ``path``'s tensor table (memory-mapped, no tensor data is copied)."""
    return read_gguf(path)[0]


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
