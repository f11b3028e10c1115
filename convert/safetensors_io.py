"""Memory-mapped safetensors reading with a strict header check.

A safetensors file is an 8-byte little-endian header length, a JSON header and a
byte buffer. Every claim the header makes (length, JSON, dtype, shape, offsets) is
checked against the file before any tensor is touched, so a truncated download or a
lying header becomes one ``InputFileError`` naming the file instead of garbage
weights or a crash deep in numpy.

Tensors come back as zero-copy numpy views of the memory map (bfloat16 as ``uint16``
bit patterns); ``release`` drops a tensor's pages from this process's resident set,
so reading a model tensor by tensor keeps memory bounded by the largest tensor.
"""
from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np

from quantmill.errors import InputFileError, UnsupportedError

# safetensors dtype code -> (numpy storage dtype, bytes per element). bfloat16 and the
# 8-bit floats have no numpy dtype: they are stored as their raw bit patterns.
DTYPES: dict[str, tuple[np.dtype, int]] = {
    "F64": (np.dtype("<f8"), 8),
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),
    "I64": (np.dtype("<i8"), 8),
    "I32": (np.dtype("<i4"), 4),
    "I16": (np.dtype("<i2"), 2),
    "I8": (np.dtype("i1"), 1),
    "U64": (np.dtype("<u8"), 8),
    "U32": (np.dtype("<u4"), 4),
    "U16": (np.dtype("<u2"), 2),
    "U8": (np.dtype("u1"), 1),
    "BOOL": (np.dtype("?"), 1),
    "F8_E4M3": (np.dtype("u1"), 1),
    "F8_E5M2": (np.dtype("u1"), 1),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors library itself enforces
INDEX_NAME = "model.safetensors.index.json"
_REDOWNLOAD = "re-download or re-save the checkpoint"


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, absolute byte offset, dtype code and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def n_elements(self) -> int:
        return prod(self.shape)


def _bad(path: Path, problem: str) -> InputFileError:
    return InputFileError(path, f"not a valid safetensors file: {problem}", _REDOWNLOAD)


def _check_entry(path: Path, name: str, meta: object, data_size: int) -> tuple[str, tuple[int, ...], int, int]:
    if not isinstance(meta, dict):
        raise _bad(path, f"header entry {name!r} is not an object")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if dtype not in DTYPES:
        raise _bad(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _bad(path, f"tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise _bad(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise _bad(path, f"tensor {name!r} has data_offsets {offsets} out of order")
    if end > data_size:
        raise _bad(
            path,
            f"tensor {name!r} ends at byte {end} of the data section but the file holds only {data_size}"
            " (truncated file or lying header)",
        )
    expected = prod(shape) * DTYPES[dtype][1]
    if end - begin != expected:
        raise _bad(path, f"tensor {name!r} spans {end - begin} bytes but dtype {dtype} and shape {shape} need {expected}")
    return dtype, tuple(shape), begin, end


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and validate the header of ``path``; return its tensors (sorted by name) and metadata."""
    path = Path(path)
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _bad(path, f"file is only {file_size} bytes long")
            header_len = int.from_bytes(prefix, "little")
            if header_len < 2 or header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
                raise _bad(path, f"header length {header_len} does not fit a file of {file_size} bytes")
            raw = f.read(header_len)
    except OSError as exc:
        raise InputFileError(path, f"cannot read file ({exc.strerror})", "check the path and its permissions") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    data_start = 8 + header_len
    data_size = file_size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(path, "__metadata__ must map strings to strings")
    spans: list[tuple[int, int, str]] = []
    entries: dict[str, TensorEntry] = {}
    for name, meta in header.items():
        dtype, shape, begin, end = _check_entry(path, name, meta, data_size)
        spans.append((begin, end, name))
        entries[name] = TensorEntry(name, dtype, shape, path, data_start + begin, end - begin)
    spans.sort()
    for (b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise _bad(path, f"tensors {n0!r} and {n1!r} overlap in the data section")
    return dict(sorted(entries.items())), metadata


def to_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    """Widen a stored tensor to float32 exactly (bfloat16 bit patterns included)."""
    if dtype == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    if dtype in FLOAT_DTYPES:
        return array.astype(np.float32)
    raise UnsupportedError(f"tensor dtype {dtype} cannot be converted to float; only F64/F32/F16/BF16 weights are supported")


class SafetensorsFile:
    """One safetensors file: validated header plus a read-only memory map."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entries, self.metadata = read_header(self.path)
        self._file = open(self.path, "rb")
        size = os.fstat(self._file.fileno()).st_size
        self._map: mmap.mmap | None = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def array(self, name: str) -> np.ndarray:
        """A zero-copy view of tensor ``name`` in its storage dtype (see ``DTYPES``)."""
        entry = self.entries[name]
        np_dtype = DTYPES[entry.dtype][0]
        if entry.nbytes == 0:
            return np.zeros(entry.shape, dtype=np_dtype)
        assert self._map is not None
        flat = np.frombuffer(self._map, dtype=np_dtype, count=entry.n_elements, offset=entry.offset)
        return flat.reshape(entry.shape)

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None:
        """Drop bytes [start, stop) of tensor ``name`` from this process's resident memory.

        The pages stay in the kernel's page cache; touching them again faults them back in.
        """
        entry = self.entries[name]
        stop = entry.nbytes if stop is None else min(stop, entry.nbytes)
        if self._map is None or stop <= start or not hasattr(mmap, "MADV_DONTNEED"):
            return
        begin = entry.offset + start
        begin -= begin % mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, begin, entry.offset + stop - begin)

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a caller still holds a view; the map goes with it
                pass
            self._map = None
        self._file.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _part_names(model_dir: Path) -> list[str]:
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
            raise InputFileError(index, f"not a valid safetensors index ({exc})", _REDOWNLOAD) from exc
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise InputFileError(index, "has no 'weight_map' object of tensor -> file names", _REDOWNLOAD)
        for tensor, part in weight_map.items():
            # a shard is a plain file name in the model directory: never a path that leaves it
            if not part or part != Path(part).name or part in (".", "..") or "\\" in part:
                raise InputFileError(index, f"weight_map entry {tensor!r} -> {part!r} is not a file name in the model"
                                     " directory", "fix the index (shards are plain file names next to it)")
        return sorted(set(weight_map.values()))
    return sorted(p.name for p in model_dir.iterdir() if p.name.startswith("model") and p.suffix == ".safetensors")


class Checkpoint:
    """All safetensors files of a Hugging Face model directory, single-file or sharded.

    Tensors are ordered part by part (parts sorted by file name), by name within a
    part: the order llama.cpp's converter visits them in.
    """

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        names = _part_names(self.model_dir)
        if not names:
            pickles = sorted(self.model_dir.glob("pytorch_model*.bin"))
            hint = (
                f"found {pickles[0].name} (pickle), which quantmill does not load; re-save the model with"
                " safe_serialization=True"
                if pickles
                else "expected model.safetensors or model-0000N-of-0000M.safetensors with model.safetensors.index.json"
            )
            raise InputFileError(self.model_dir, "no safetensors weights found", hint)
        self.files: list[SafetensorsFile] = []
        self.entries: dict[str, TensorEntry] = {}
        self._owner: dict[str, SafetensorsFile] = {}
        try:
            for name in names:
                part = self.model_dir / name
                if part.is_dir():
                    raise InputFileError(part, "is a directory, not a safetensors file", "replace it with the weights file")
                if not part.is_file() and not (self.model_dir / INDEX_NAME).is_file():
                    raise InputFileError(part, "is not a regular file", "replace it with the weights file")
                if not part.is_file():
                    raise InputFileError(part, f"listed in {INDEX_NAME} but missing", "download every shard of the checkpoint")
                st = SafetensorsFile(part)
                self.files.append(st)
                for tname, entry in st.entries.items():
                    if tname in self.entries:
                        raise InputFileError(part, f"tensor {tname!r} also appears in {self.entries[tname].file.name}", _REDOWNLOAD)
                    self.entries[tname] = entry
                    self._owner[tname] = st
            self._check_index()
        except BaseException:
            self.close()
            raise

    def _check_index(self) -> None:
        index = self.model_dir / INDEX_NAME
        if not index.is_file():
            return
        weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        missing = sorted(set(weight_map) - set(self.entries))
        extra = sorted(set(self.entries) - set(weight_map))
        if missing:
            files = sorted({weight_map[n] for n in missing})
            raise InputFileError(index, f"lists {len(missing)} tensors (e.g. {missing[0]!r}) absent from {', '.join(files)}", _REDOWNLOAD)
        if extra:
            raise InputFileError(index, f"does not list {len(extra)} tensors found in the shards (e.g. {extra[0]!r})", _REDOWNLOAD)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def array(self, name: str) -> np.ndarray:
        return self._owner[name].array(name)

    def release(self, name: str) -> None:
        self._owner[name].release(name)

    def fileno(self, name: str) -> int:
        """File descriptor of the file holding tensor ``name``."""
        return self._owner[name].fileno()

    def release_rows(self, name: str, start: int, stop: int) -> None:
        """Release rows [start, stop) of tensor ``name`` (rows along its first axis, flattened)."""
        entry = self.entries[name]
        row_bytes = entry.nbytes // max(1, prod(entry.shape[:-1]))
        self._owner[name].release(name, start * row_bytes, stop * row_bytes)

    def iter_tensors(self) -> Iterator[tuple[TensorEntry, np.ndarray]]:
        """Yield (entry, zero-copy view) one tensor at a time, releasing each after use."""
        for name, entry in self.entries.items():
            yield entry, self.array(name)
            self.release(name)

    def close(self) -> None:
        for st in self.files:
            st.close()
        self.files = []

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
