"""Writing one GPTQ branch: packed linears, float16 rest, configs and tokenizer files.

Layers are quantized in layer order but a checkpoint lists its tensors by name, so each
layer's packed tensors go to a spool file inside the (temporary) branch directory as soon as
they exist; ``finish`` then writes the safetensors file(s) in sorted name order, one tensor at
a time (the spool and the source checkpoint are read back, never held), sharded with an
index above ``max_shard_bytes``. Memory stays bounded by the largest tensor.

The branch is a v1 ("gptq") checkpoint as AutoGPTQ and GPTQModel write it: ``quantize_config.json``
and ``config.json``'s ``quantization_config`` carry the same fields.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from quantmill import __version__
from quantmill.convert.safetensors_io import Checkpoint, OutputTensor, encode_float, to_float32, write_checkpoint
from quantmill.quantize.gptq.branches import BranchSpec

QUANTIZE_CONFIG = "quantize_config.json"
QUANT_LOG = "quantization_log.json"
BRANCH_RECORD = "quantmill_gptq.json"  # a compressed-tensors branch's spec and record
SPOOL_NAME = ".quantmill-spool"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
# files of a model directory that travel with the weights (those that exist are copied)
COMPANION_FILES = (
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "merges.txt",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
)
_NUMPY_CODES = {np.dtype("int64"): "I64", np.dtype("int32"): "I32", np.dtype("float16"): "F16", np.dtype("float32"): "F32"}


@dataclass(frozen=True)
class SpoolEntry:
    offset: int
    tensor: OutputTensor


class BranchWriter:
    """Collects one branch's tensors in ``directory`` (a temporary branch directory)."""

    def __init__(self, directory: Path, spec: BranchSpec, spool_path: Path | None = None) -> None:
        self.directory = Path(directory)
        self.spec = spec
        self.spool_path = spool_path or self.directory / SPOOL_NAME  # elsewhere: kept by a layer checkpoint
        self._spool: BinaryIO | None = open(self.spool_path, "wb")
        self._size = 0
        self.entries: dict[str, SpoolEntry] = {}
        self.replaced: set[str] = set()  # source tensors that the packed ones stand for

    def state(self) -> dict[str, Any]:
        """What :meth:`restore` needs to continue this spool after a checkpoint (the spool is flushed to disk)."""
        assert self._spool is not None, "writer already finished"
        self._spool.flush()
        os.fsync(self._spool.fileno())
        return {"size": self._size, "replaced": sorted(self.replaced),
                "entries": [[name, e.offset, list(e.tensor.shape), e.tensor.dtype] for name, e in self.entries.items()]}

    @classmethod
    def restore(cls, directory: Path, spec: BranchSpec, spool_path: Path, state: dict[str, Any]) -> BranchWriter:
        """A writer continuing the spool at ``spool_path`` as it was when ``state`` was taken (later bytes dropped)."""
        writer = cls.__new__(cls)
        writer.directory, writer.spec, writer.spool_path = Path(directory), spec, spool_path
        spool = open(spool_path, "r+b")
        spool.truncate(state["size"])
        spool.seek(state["size"])
        writer._spool, writer._size = spool, int(state["size"])
        writer.entries = {name: SpoolEntry(offset, OutputTensor(name, tuple(shape), dtype))
                          for name, offset, shape, dtype in state["entries"]}
        writer.replaced = set(state["replaced"])
        return writer

    def add(self, name: str, array: np.ndarray) -> None:
        """Spool one tensor (int32 / float16 / float32 numpy array) under checkpoint name ``name``."""
        assert self._spool is not None, "writer already finished"
        if name in self.entries:
            raise ValueError(f"tensor {name} written twice")
        data = np.ascontiguousarray(array)
        code = _NUMPY_CODES[data.dtype]
        self.entries[name] = SpoolEntry(self._size, OutputTensor(name, tuple(data.shape), code))
        blob = data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes()
        self._spool.write(blob)
        self._size += len(blob)

    def _source_tensors(self, source: Checkpoint) -> list[OutputTensor]:
        return [
            OutputTensor(name, entry.shape, "F16")
            for name, entry in source.entries.items()
            if name not in self.replaced and name not in self.entries
        ]

    def finish(self, source: Checkpoint, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
        """Write the safetensors file(s) in name order; the rest of the model goes in float16."""
        assert self._spool is not None, "writer already finished"
        self._spool.close()
        self._spool = None
        tensors = sorted([e.tensor for e in self.entries.values()] + self._source_tensors(source), key=lambda t: t.name)
        with open(self.spool_path, "rb") as spool:

            def produce(tensor: OutputTensor) -> bytes:
                entry = self.entries.get(tensor.name)
                if entry is not None:
                    spool.seek(entry.offset)
                    return spool.read(tensor.nbytes)
                import torch

                stored = source.entries[tensor.name]
                values = torch.from_numpy(np.ascontiguousarray(to_float32(source.array(tensor.name), stored.dtype)))
                blob = encode_float(values, "F16")
                source.release(tensor.name)
                return blob

            names = write_checkpoint(self.directory, tensors, produce, max_shard_bytes)
        if self.spool_path.parent == self.directory:  # a checkpoint's spool stays until the whole pass is done
            self.spool_path.unlink()
        return names

    def abort(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None


def quantization_config(spec: BranchSpec, meta: dict[str, Any]) -> dict[str, Any]:
    """config.json's ``quantization_config`` in the branch's format (for v1 also quantize_config.json)."""
    return spec.checkpoint_format.config(spec, meta)


def write_configs(directory: Path, source_dir: Path, source_config: dict[str, Any], qconfig: dict[str, Any],
                  spec: BranchSpec | None = None, meta: dict[str, Any] | None = None) -> None:
    """config.json (the source's, plus quantization_config, dtype float16), quantize_config.json, companions.

    A branch whose format has no quantize_config.json (compressed-tensors) gets ``quantmill_gptq.json``
    instead: the branch spec and quantmill's record (``meta``), which that format's config cannot carry."""
    if spec is not None and not spec.checkpoint_format.writes_quantize_config:
        _write_json(directory / BRANCH_RECORD, {"format": spec.format, "branch": spec.short, "bits": spec.bits,
                                                "group_size": spec.group_size, "desc_act": spec.desc_act,
                                                "sym": spec.sym, "static_groups": spec.static_groups,
                                                "damp_percent": spec.damp_percent, **spec.grid_record(),
                                                "meta": {"quantizer": [f"quantmill:{__version__}"], **(meta or {})}})
        _write_config_json(directory, source_dir, source_config, qconfig)
        return
    _write_config_json(directory, source_dir, source_config, qconfig)
    _write_json(directory / QUANTIZE_CONFIG, qconfig)


def _write_config_json(directory: Path, source_dir: Path, source_config: dict[str, Any], qconfig: dict[str, Any]) -> None:
    config = dict(source_config)
    config.pop("quantization_config", None)
    config["quantization_config"] = qconfig
    for key in ("dtype", "torch_dtype"):
        if key in config or key == "dtype":
            config[key] = "float16"
    _write_json(directory / "config.json", config)
    for name in COMPANION_FILES:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, directory / name)


def write_log(directory: Path, records: dict[str, Any]) -> None:
    _write_json(directory / QUANT_LOG, records)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
