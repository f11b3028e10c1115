"""Read a GGUF file: typed metadata and dequantized tensors, with clear errors.

A thin layer over ``gguf.GGUFReader``: every problem with the file (missing, not a GGUF,
truncated, a key of the wrong type) becomes one ``InputFileError`` naming the file.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from quantmill.errors import InputFileError

if TYPE_CHECKING:  # numpy and gguf-py load when a file is opened: the magic check alone stays light
    import numpy as np

GGUF_MAGIC = b"GGUF"
_REDOWNLOAD = "re-download or re-create the GGUF file"

_INT_TYPES = frozenset({"UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64"})
_FLOAT_TYPES = frozenset({"FLOAT32", "FLOAT64"})


class GGUFTensorInfo(NamedTuple):
    """One tensor as stored: ``shape`` in row-major (numpy / PyTorch) order."""

    name: str
    shape: tuple[int, ...]
    qtype: str
    n_bytes: int


class GGUFFile:
    """An open GGUF file. Use :meth:`open`; values come back as plain Python types."""

    def __init__(self, path: Path, reader: Any) -> None:
        self.path = path
        self._reader = reader
        self._tensors = {t.name: t for t in reader.tensors}

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | Path) -> GGUFFile:
        path = Path(path)
        check_gguf_magic(path)
        import gguf

        try:
            reader = gguf.GGUFReader(path, "r")
        except (ValueError, IndexError, OSError, KeyError, OverflowError) as exc:
            raise InputFileError(path, f"truncated or corrupt GGUF file ({_short(exc)})", _REDOWNLOAD) from exc
        gguf_file = cls(path, reader)
        gguf_file._check_complete()
        return gguf_file

    def _check_complete(self) -> None:
        size = self.path.stat().st_size
        for tensor in self._reader.tensors:
            end = int(tensor.data_offset) + int(tensor.n_bytes)
            if end > size or tensor.data.nbytes != int(tensor.n_bytes):
                raise InputFileError(
                    self.path,
                    f"truncated GGUF file: tensor {tensor.name} ends at byte {end} but the file has {size}",
                    _REDOWNLOAD,
                )

    # ----------------------------------------------------------------- metadata
    def keys(self) -> list[str]:
        return sorted(self._reader.fields)

    def has(self, key: str) -> bool:
        return key in self._reader.fields

    def _field(self, key: str) -> Any:
        field = self._reader.fields.get(key)
        if field is None:
            raise InputFileError(self.path, f"metadata key {key!r} is missing", _REDOWNLOAD)
        return field

    def _value_types(self, key: str) -> list[str]:
        return [t.name for t in self._field(key).types]

    def _typed(self, key: str, allowed: frozenset[str], what: str, default: Any) -> Any:
        if default is not _REQUIRED and not self.has(key):
            return default
        types = self._value_types(key)
        if len(types) != 1 or types[0] not in allowed:
            raise InputFileError(self.path, f"metadata key {key!r} is {'/'.join(types)}, expected {what}", _REDOWNLOAD)
        return self._field(key).contents()

    def get_str(self, key: str, default: Any = None) -> str:
        return self._typed(key, frozenset({"STRING"}), "a string", default)

    def get_int(self, key: str, default: Any = None) -> Any:
        value = self._typed(key, _INT_TYPES, "an integer", default)
        return value if value is None else int(value)

    def get_float(self, key: str, default: Any = None) -> Any:
        value = self._typed(key, _FLOAT_TYPES | _INT_TYPES, "a number", default)
        if value is None:
            return value
        if self._value_types(key)[0] == "FLOAT32":
            # shortest decimal that round-trips the stored float32 (1e-05, not 9.99999974738e-06)
            import numpy as np

            return float(str(np.float32(value)))
        return float(value)

    def get_bool(self, key: str, default: Any = None) -> Any:
        value = self._typed(key, frozenset({"BOOL"}), "a boolean", default)
        return value if value is None else bool(value)

    def get_array(self, key: str, default: Any = None) -> list[Any]:
        if default is not _REQUIRED and not self.has(key):
            return default
        types = self._value_types(key)
        if types[0] != "ARRAY":
            raise InputFileError(self.path, f"metadata key {key!r} is {types[0]}, expected an array", _REDOWNLOAD)
        return list(self._field(key).contents())

    def require_str(self, key: str) -> str:
        return self.get_str(key, _REQUIRED)

    def require_int(self, key: str) -> int:
        return self.get_int(key, _REQUIRED)

    def require_array(self, key: str) -> list[Any]:
        return self.get_array(key, _REQUIRED)

    @property
    def architecture(self) -> str:
        return self.require_str("general.architecture")

    # ------------------------------------------------------------------ tensors
    def tensor_infos(self) -> list[GGUFTensorInfo]:
        """Tensors in file order."""
        return [self.tensor_info(t.name) for t in self._reader.tensors]

    def tensor_info(self, name: str) -> GGUFTensorInfo:
        tensor = self._tensor(name)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        return GGUFTensorInfo(name, shape, tensor.tensor_type.name, int(tensor.n_bytes))

    def has_tensor(self, name: str) -> bool:
        return name in self._tensors

    def _tensor(self, name: str) -> Any:
        tensor = self._tensors.get(name)
        if tensor is None:
            raise InputFileError(self.path, f"tensor {name!r} is missing", _REDOWNLOAD)
        return tensor

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as float32 in row-major shape (``gguf.quants.dequantize``)."""
        import gguf
        import numpy as np

        tensor = self._tensor(name)
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise InputFileError(
                self.path,
                f"tensor {name} has type {tensor.tensor_type.name}, which gguf-py cannot dequantize",
                "convert from a GGUF with a supported type (F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1, K-quants)",
            ) from exc
        info = self.tensor_info(name)
        return np.asarray(values, dtype=np.float32).reshape(info.shape)


class _Required:
    def __repr__(self) -> str:
        return "<required>"


_REQUIRED: Any = _Required()


def check_gguf_magic(path: Path) -> None:
    """Raise InputFileError unless ``path`` is a readable file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except FileNotFoundError as exc:
        raise InputFileError(path, "no such file", "check the path") from exc
    except IsADirectoryError as exc:
        raise InputFileError(path, "is a directory, not a GGUF file", "pass the path of a .gguf file") from exc
    except OSError as exc:
        raise InputFileError(path, f"cannot read the file ({exc.strerror})", "check its permissions") from exc
    if magic != GGUF_MAGIC:
        found = "an empty file" if not magic else f"magic {magic!r}"
        raise InputFileError(path, f"not a GGUF file ({found}, expected b'GGUF')", "pass a .gguf model file")


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 120 else text[:117] + "..."
