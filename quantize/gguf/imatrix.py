"""Importance-matrix files in llama.cpp's GGUF imatrix format: write, read, and name mapping.

The format (as ``llama-imatrix`` writes it and ``llama-quantize --imatrix`` reads it): a
GGUF file with ``general.type = "imatrix"``, the keys ``imatrix.datasets`` (array of
strings), ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (uint32), and per weight
tensor (GGUF name, e.g. ``blk.0.attn_q.weight``) two F32 tensors: ``<name>.in_sum2``
(ne = [n_in, n_mat], raw Σx² per input column) and ``<name>.counts`` (ne = [1, n_mat],
tokens seen), n_mat being 1 for a dense linear. Tensors are stored sorted by name.
quantmill adds ``quantmill.calibration.*`` keys that record the calibration sequences
(their token sha256, seed, sizes); llama.cpp ignores them.

The importance matrix is per INPUT column, so llama.cpp's row permutation of attn_q /
attn_k does not change it.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from quantmill.atomic import atomic_file
from quantmill.errors import InputFileError

if TYPE_CHECKING:
    from quantmill.calib_data.sampling import CalibrationSet
    from quantmill.quantize.stats import ImportanceStats

KEY_TYPE = "general.type"
TYPE_IMATRIX = "imatrix"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUFFIX_SUMS = ".in_sum2"
SUFFIX_COUNTS = ".counts"
CALIB_KEY_PREFIX = "quantmill.calibration."
_REMAKE = "re-create it with `quantmill calibrate`"


@dataclass(frozen=True)
class ImatrixEntry:
    """Raw statistics of one weight tensor: Σx² (n_mat, n_in) and token counts (n_mat,)."""

    sums: np.ndarray
    counts: np.ndarray

    def means(self) -> np.ndarray:
        """Σx²/count per column, flattened; 1.0 where a matrix saw no token (as llama-quantize does)."""
        out = np.ones_like(self.sums, dtype=np.float32)
        seen = self.counts > 0
        out[seen] = (self.sums[seen] / self.counts[seen, None]).astype(np.float32)
        return out.reshape(-1)


@dataclass(frozen=True)
class Imatrix:
    """An importance matrix: entries by GGUF weight name, plus the file's metadata."""

    entries: dict[str, ImatrixEntry]
    datasets: tuple[str, ...]
    chunk_count: int
    chunk_size: int
    calibration: dict[str, Any] = field(default_factory=dict)

    def means(self) -> dict[str, np.ndarray]:
        """GGUF weight name -> float32 mean squared activation per input column (sorted by name)."""
        return {name: self.entries[name].means() for name in sorted(self.entries)}


@functools.cache
def _tensor_name_map(gguf_arch: Any, n_layers: int) -> Any:
    import gguf

    return gguf.get_tensor_name_map(gguf_arch, n_layers)  # slow to build: once per model


def gguf_weight_name(gguf_arch: Any, hf_linear: str, n_layers: int) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q.weight`` via gguf-py's tensor-name map."""
    mapped = _tensor_name_map(gguf_arch, n_layers).get_name(hf_linear)
    if mapped is None:
        raise KeyError(f"no GGUF name for {hf_linear!r} in gguf-py's {gguf_arch.name} tensor map")
    return f"{mapped}.weight"


def imatrix_from_stats(stats: ImportanceStats, calib: CalibrationSet) -> Imatrix:
    """Turn the statistics pass's Σx² per HF linear into GGUF-named imatrix entries."""
    entries: dict[str, ImatrixEntry] = {}
    for hf_name, sums in stats.sum_squares.items():
        name = gguf_weight_name(stats.arch.gguf_arch, hf_name, stats.n_layers)
        entries[name] = ImatrixEntry(
            sums=np.asarray(sums, dtype=np.float32).reshape(1, -1),
            counts=np.array([stats.counts[hf_name]], dtype=np.int64),
        )
    return Imatrix(
        entries=dict(sorted(entries.items())),
        datasets=(calib.source,),
        chunk_count=calib.samples,
        chunk_size=calib.seqlen,
        calibration=calib.record(),
    )


def write_imatrix(imatrix: Imatrix, path: Path) -> Path:
    """Write ``imatrix`` to ``path`` atomically; the same imatrix always gives the same bytes."""
    import gguf

    path = Path(path)
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch=TYPE_IMATRIX)
        # GGUFWriter always adds general.architecture; llama-imatrix files carry no such key.
        for shard_kv in writer.kv_data:
            shard_kv.pop(gguf.Keys.General.ARCHITECTURE, None)
        writer.add_type(TYPE_IMATRIX)
        writer.add_array(KEY_DATASETS, list(imatrix.datasets))
        writer.add_uint32(KEY_CHUNK_COUNT, imatrix.chunk_count)
        writer.add_uint32(KEY_CHUNK_SIZE, imatrix.chunk_size)
        for key, value in sorted(imatrix.calibration.items()):
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise TypeError(f"calibration record {key!r} must be an int or a string")
            if isinstance(value, int):
                writer.add_uint64(CALIB_KEY_PREFIX + key, value)
            else:
                writer.add_string(CALIB_KEY_PREFIX + key, value)
        for name in sorted(imatrix.entries):
            entry = imatrix.entries[name]
            sums = np.ascontiguousarray(entry.sums, dtype=np.float32)
            counts = np.ascontiguousarray(entry.counts, dtype=np.float32).reshape(-1, 1)
            writer.add_tensor(name + SUFFIX_SUMS, sums)
            writer.add_tensor(name + SUFFIX_COUNTS, counts)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def _field_value(reader: Any, key: str) -> Any:
    fld = reader.fields.get(key)
    return None if fld is None else fld.contents()


def read_imatrix(path: Path) -> Imatrix:
    """Read a GGUF imatrix file (llama-imatrix's or quantmill's); InputFileError when it is not one."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "no such imatrix file", "pass the file `quantmill calibrate` wrote")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise InputFileError(path, f"is not a GGUF file ({exc})", "pass a GGUF imatrix (the legacy .dat format is not read); " + _REMAKE) from exc
    if _field_value(reader, KEY_TYPE) != TYPE_IMATRIX:
        raise InputFileError(path, f"is a GGUF file but not an imatrix ({KEY_TYPE} is {_field_value(reader, KEY_TYPE)!r})", _REMAKE)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise InputFileError(path, f"tensor {tensor.name} is {tensor.tensor_type.name}, not F32", _REMAKE)
        data = np.array(tensor.data, dtype=np.float32)
        if not np.isfinite(data).all():
            raise InputFileError(path, f"imatrix tensor {tensor.name!r} holds NaN or infinite values", _REMAKE)
        n_in = int(tensor.shape[0])
        if tensor.name.endswith(SUFFIX_SUMS):
            sums[tensor.name.removesuffix(SUFFIX_SUMS)] = data.reshape(-1, n_in)
        elif tensor.name.endswith(SUFFIX_COUNTS):
            counts[tensor.name.removesuffix(SUFFIX_COUNTS)] = np.rint(data.reshape(-1)).astype(np.int64)
    if set(sums) != set(counts) or not sums:
        odd = sorted(set(sums) ^ set(counts))
        raise InputFileError(path, f"has no matching in_sum2/counts pairs (unpaired: {odd[:3]})", _REMAKE)
    entries: dict[str, ImatrixEntry] = {}
    for name in sorted(sums):
        if sums[name].shape[0] != counts[name].shape[0]:
            raise InputFileError(path, f"{name}: {sums[name].shape[0]} sum rows but {counts[name].shape[0]} counts", _REMAKE)
        entries[name] = ImatrixEntry(sums[name], counts[name])
    datasets = _field_value(reader, KEY_DATASETS) or []
    calibration = {
        key.removeprefix(CALIB_KEY_PREFIX): _field_value(reader, key)
        for key in sorted(reader.fields)
        if key.startswith(CALIB_KEY_PREFIX)
    }
    return Imatrix(
        entries=entries,
        datasets=tuple(str(d) for d in datasets),
        chunk_count=int(_field_value(reader, KEY_CHUNK_COUNT) or 0),
        chunk_size=int(_field_value(reader, KEY_CHUNK_SIZE) or 0),
        calibration=calibration,
    )


def imatrix_means(imatrix: Imatrix | Mapping[str, np.ndarray] | Path | str) -> dict[str, np.ndarray]:
    """Mean squared activations by GGUF weight name, from an Imatrix, a file, or a ready mapping."""
    if isinstance(imatrix, (str, Path)):
        imatrix = read_imatrix(Path(imatrix))
    if isinstance(imatrix, Imatrix):
        return imatrix.means()
    return {name: np.ascontiguousarray(imatrix[name], dtype=np.float32).reshape(-1) for name in sorted(imatrix)}
