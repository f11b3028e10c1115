"""The safetensors reader: exact tensors, strict header validation (safe_open's own words), sharded checkpoints."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from quantmill.convert.safetensors_io import Checkpoint, SafetensorsFile, read_header, to_float32
from quantmill.errors import InputFileError


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "b.weight": rng.standard_normal((7, 5)).astype(np.float16),
        "a.weight": rng.standard_normal((3, 4, 2)).astype(np.float32),
        "c.bias": rng.standard_normal(6).astype(np.float64),
        "d.ids": np.arange(5, dtype=np.int64),
        "e.empty": np.zeros((0, 3), dtype=np.float32),
    }


def _raw_file(path: Path, header: dict[str, object], data: bytes, header_len: int | None = None) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if header_len is None else header_len) + blob + data)
    return path


def test_reads_every_tensor_exactly_sorted_by_name(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with SafetensorsFile(tmp_path / "model.safetensors") as st:
        assert list(st.entries) == sorted(tensors)
        assert st.metadata == {"format": "pt"}
        for name, expected in tensors.items():
            got = st.array(name)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert np.array_equal(got, expected)
            st.release(name)
            assert np.array_equal(st.array(name), expected)  # readable again after release


def test_bfloat16_is_read_as_bit_patterns_and_widened_exactly(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    values = torch.randn(64, 33, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    values[0, :4] = torch.tensor([0.0, -0.0, float("inf"), 1e-40])
    save_torch({"w": values}, str(tmp_path / "model.safetensors"))
    with SafetensorsFile(tmp_path / "model.safetensors") as st:
        raw = st.array("w")
        assert raw.dtype == np.uint16
        assert np.array_equal(raw, values.view(torch.int16).numpy().view(np.uint16))
        widened = to_float32(raw, "BF16")
        assert np.array_equal(widened.view(np.uint32), values.float().numpy().view(np.uint32))


@pytest.mark.parametrize(
    ("header", "data", "header_len", "problem"),
    [
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, None, "truncated file or lying header"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 12, None, "invalid shape, data type, or offset"),
        ({"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, None, "unknown variant `Q4`"),
        ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, b"\0" * 16, None, "expected usize"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, b"\0" * 16, None, "invalid offset for tensor `w`"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0]}}, b"\0" * 16, None, "expected a tuple of size 2"),
        (
            {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}},
            b"\0" * 16, None, "invalid offset for tensor `b`",
        ),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, 10**9, "header too large"),
        ({"__metadata__": {"format": 3}}, b"", None, "expected a string"),
        ({"w": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 16, None, "which quantmill does not read"),
    ],
)
def test_lying_or_truncated_headers_name_the_file(tmp_path: Path, header: dict, data: bytes, header_len: int | None, problem: str) -> None:
    path = _raw_file(tmp_path / "bad.safetensors", header, data, header_len)
    with pytest.raises(InputFileError) as info:
        read_header(path)
    message = str(info.value)
    assert str(path) in message and problem in message and "\n" not in message


def test_truncated_real_file_and_garbage_header(tmp_path: Path) -> None:
    good = tmp_path / "model.safetensors"
    save_file(_tensors(), str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(InputFileError, match="truncated file or lying header"):
        read_header(cut)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 8) + b"not json")
    with pytest.raises(InputFileError, match="invalid JSON in header"):
        read_header(garbage)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\1\2")
    with pytest.raises(InputFileError, match="header too small"):
        read_header(tiny)


def _sharded(tmp_path: Path) -> dict[str, np.ndarray]:
    tensors = _tensors()
    names = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    weight_map = {}
    for part, members in parts.items():
        save_file({n: tensors[n] for n in members}, str(tmp_path / part))
        weight_map.update({n: part for n in members})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tensors


def test_sharded_checkpoint_yields_every_tensor_once(tmp_path: Path) -> None:
    tensors = _sharded(tmp_path)
    with Checkpoint(tmp_path) as ckpt:
        seen = {name: ckpt.array(name).copy() for name in ckpt.entries}
        assert [f.path.name for f in ckpt.files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert seen.keys() == tensors.keys()
    for name, array in tensors.items():
        assert np.array_equal(seen[name], array)


def test_sharded_checkpoint_with_a_missing_shard(tmp_path: Path) -> None:
    _sharded(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(InputFileError, match="missing"):
        Checkpoint(tmp_path)


def test_index_that_lists_absent_tensors(tmp_path: Path) -> None:
    _sharded(tmp_path)
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(InputFileError, match="ghost.weight"):
        Checkpoint(tmp_path)


def test_directory_without_safetensors_mentions_pickles(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(InputFileError, match="safe_serialization"):
        Checkpoint(tmp_path)
