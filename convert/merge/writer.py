"""Streaming safetensors output, single file or sharded with an index.

Every tensor's shape and dtype are known before any data is computed, so each file's
header (offsets included) is written first and the tensors follow one at a time: memory
holds one tensor, never the model. Tensor order, shard split and JSON are deterministic.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING

from quantmill.errors import OutputError

if TYPE_CHECKING:
    import torch

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
# output dtype names (CLI / config) -> safetensors dtype code
FLOAT_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * ITEMSIZE[self.dtype]


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


def _header(tensors: list[OutputTensor]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
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
    max_shard_bytes: int,
    progress: Callable[[Iterable[OutputTensor]], Iterable[OutputTensor]] = iter,
) -> list[str]:
    """Write ``tensors`` (in order) into ``out_dir``; ``produce`` gives each one's bytes. Returns file names."""
    shards = plan_shards(tensors, max_shard_bytes)
    names = shard_names(len(shards))
    ordered = iter(progress(tensors))
    for name, shard in zip(names, shards, strict=True):
        blob = _header(shard)
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
