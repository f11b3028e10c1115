"""Safetensors I/O: reading through the ``safetensors`` library, and the project's one streaming writer.

Reading: ``safe_open`` parses and validates each file's header (JSON, dtypes, shapes, offsets that
cover the data section exactly), so a truncated download or a lying header becomes one
``InputFileError`` naming the file instead of garbage weights or a crash deep in numpy. The
tensors are zero-copy numpy views of one read-only memory map per file (bfloat16 as ``uint16``
bit patterns), at the offsets that validated layout implies; ``release`` drops a tensor's pages
from this process's resident set, so reading a model tensor by tensor keeps memory bounded by
the largest tensor.

Writing: every tensor's shape and dtype are known before any data is computed, so each file's
header (offsets included) is written first and the tensors follow one at a time: memory holds
one tensor, never the model. Tensor order, shard split and JSON are deterministic.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from quantmill.errors import InputFileError, OutputError, UnsupportedError
from quantmill.jsonio import read_json_object

if TYPE_CHECKING:
    import torch

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
# output dtype names (CLI / config) -> safetensors dtype code
FLOAT_CODES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_REDOWNLOAD = "re-download or re-save the checkpoint"
# the library's words -> what they mean for the file in hand
_EXPLAINED = {"incomplete metadata": "truncated file or lying header", "invalid offset": "overlapping or misplaced data",
              "header too small": "too short for a safetensors file"}


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


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Validate ``path``'s header with ``safe_open``; return its tensors (sorted by name) and metadata."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), "numpy") as handle:
            layout = [(name, handle.get_slice(name)) for name in handle.offset_keys()]
            tensors = [(name, view.get_dtype(), tuple(view.get_shape())) for name, view in layout]
            metadata = handle.metadata() or {}
        file_size = path.stat().st_size
    except SafetensorError as exc:
        problem = str(exc).removeprefix("Error while deserializing header: ")
        hint = next((f" ({why})" for words, why in _EXPLAINED.items() if problem.startswith(words)), "")
        raise _bad(path, problem + hint) from exc
    except OSError as exc:
        raise InputFileError(path, f"cannot read file ({exc.strerror or exc})", "check the path and its permissions") from exc
    unknown = next((f"tensor {name!r} has dtype {dtype}" for name, dtype, _ in tensors if dtype not in DTYPES), None)
    if unknown:
        raise _bad(path, f"{unknown}, which quantmill does not read")
    # safe_open has checked that the tensors, in offset order, fill the data section end to end
    offset = file_size - sum(prod(shape) * DTYPES[dtype][1] for _, dtype, shape in tensors)
    entries: dict[str, TensorEntry] = {}
    for name, dtype, shape in tensors:
        nbytes = prod(shape) * DTYPES[dtype][1]
        entries[name] = TensorEntry(name, dtype, shape, path, offset, nbytes)
        offset += nbytes
    return dict(sorted(entries.items())), metadata


def tensor_entries(files: Iterable[Path]) -> list[TensorEntry]:
    """Every tensor of the safetensors ``files``, file by file, from their validated headers (no data read)."""
    return [entry for path in files for entry in read_header(path)[0].values()]


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


def _weight_map(model_dir: Path) -> dict[str, str] | None:
    """The index's tensor -> shard map (None without an index), every shard a plain file name."""
    index = model_dir / INDEX_NAME
    if not index.is_file():
        return None
    weight_map = read_json_object(index, _REDOWNLOAD).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputFileError(index, "has no 'weight_map' object of tensor -> file names", _REDOWNLOAD)
    for tensor, part in weight_map.items():
        # a shard is a plain file name in the model directory: never a path that leaves it
        if not part or part != Path(part).name or part in (".", "..") or "\\" in part:
            raise InputFileError(index, f"weight_map entry {tensor!r} -> {part!r} is not a file name in the model"
                                 " directory", "fix the index (shards are plain file names next to it)")
    return weight_map


class Checkpoint:
    """All safetensors files of a Hugging Face model directory, single-file or sharded.

    Tensors are ordered part by part (parts sorted by file name), by name within a
    part: the order llama.cpp's converter visits them in.
    """

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        weight_map = _weight_map(self.model_dir)
        names = sorted(set(weight_map.values()) if weight_map is not None else (
            p.name for p in self.model_dir.iterdir() if p.name.startswith("model") and p.suffix == ".safetensors"))
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
                if not part.is_file() and weight_map is None:
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
            if weight_map is not None:
                self._check_index(weight_map)
        except BaseException:
            self.close()
            raise

    def _check_index(self, weight_map: dict[str, str]) -> None:
        index = self.model_dir / INDEX_NAME
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

    def close(self) -> None:
        for st in self.files:
            st.close()
        self.files = []

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------- writing
@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * DTYPES[self.dtype][1]


def encode_float(values: torch.Tensor, dtype: str) -> bytes:
    """Little-endian bytes of float32 ``values`` rounded to nearest-even in ``dtype`` (F32/F16/BF16)."""
    import torch

    target = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype]
    cast = values.to(torch.float32).contiguous().to(target)
    if dtype == "BF16":
        cast = cast.view(torch.int16)
    return cast.numpy().tobytes()


def parse_size(text: str) -> int:
    """``5GB``, ``500MB``, ``2G``, ``1000000`` -> bytes (decimal units, as transformers uses)."""
    units = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9, "T": 10**12, "TB": 10**12}
    stripped = text.strip().upper()
    number = stripped.rstrip("KMGTB")
    unit = stripped[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise OutputError(f"--max-shard-size {text!r} is not a size; write e.g. 5GB or 500MB")
    return int(value * units[unit])


def plan_shards(tensors: list[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    """Split tensors (in the given order) into files of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _header(tensors: list[OutputTensor], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt", **metadata}}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {"dtype": tensor.dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    blob = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return blob + b" " * (-len(blob) % 8)


def write_checkpoint(
    out_dir: Path,
    tensors: list[OutputTensor],
    produce: Callable[[OutputTensor], bytes],
    max_shard_bytes: int | None = None,
    progress: Callable[[Iterable[OutputTensor]], Iterable[OutputTensor]] = iter,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Write ``tensors`` (in order) into ``out_dir``, sharded above ``max_shard_bytes`` (None: one file).

    ``produce`` gives each tensor's bytes; ``metadata`` joins ``format: pt`` in each header. Returns file names.
    """
    shards = plan_shards(tensors, max_shard_bytes) if max_shard_bytes is not None else [tensors]
    names = shard_names(len(shards))
    ordered = iter(progress(tensors))
    for name, shard in zip(names, shards, strict=True):
        blob = _header(shard, metadata or {})
        with open(out_dir / name, "wb") as handle:
            handle.write(struct.pack("<Q", len(blob)))
            handle.write(blob)
            for expected in shard:
                tensor = next(ordered)
                data = produce(tensor)
                if len(data) != expected.nbytes:
                    raise OutputError(f"tensor {tensor.name}: produced {len(data)} bytes, expected {expected.nbytes}; this is a quantmill bug")
                handle.write(data)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors)},
            "weight_map": {t.name: name for name, shard in zip(names, shards, strict=True) for t in shard},
        }
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return names
