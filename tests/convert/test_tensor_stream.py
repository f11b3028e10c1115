"""The streamed GGUF data section: the bytes do not depend on threads or chunking, and NaN/Inf is refused anywhere."""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from quantmill.convert import tensor_stream
from quantmill.convert.hf_to_gguf import convert_hf_to_gguf
from quantmill.convert.safetensors_io import TensorEntry
from quantmill.errors import InputFileError


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_bytes_do_not_depend_on_threads_or_chunk_size(make_tiny_llama: Callable[..., Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, outtype: str) -> None:
    """One worker and whole-tensor chunks vs three workers and tiny chunks (many pieces in flight across
    tensor boundaries and paddings, rows permuted across chunks): the same file."""
    model = make_tiny_llama("bpe", name="m", dtype="float16", seed=5)
    [one] = convert_hf_to_gguf(model, outtype, tmp_path / "one.gguf", threads=1, progress=False)
    monkeypatch.setattr(tensor_stream, "CHUNK_ELEMENTS", 24 * 64)  # 24 rows: not a multiple of a head (16 rows)
    [many] = convert_hf_to_gguf(model, outtype, tmp_path / "many.gguf", threads=3, progress=False)
    assert one.stat().st_size == many.stat().st_size
    assert _sha256(one) == _sha256(many)


def test_check_finite_float16_agrees_with_numpy_on_every_value() -> None:
    entry = TensorEntry("w", "F16", (3,), Path("model.safetensors"), 0, 6)
    every = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    refused = []
    for value in every:
        try:
            tensor_stream.check_finite(np.array([0.5, value, 1.0], np.float16), entry)
            refused.append(False)
        except InputFileError:
            refused.append(True)
    assert np.array_equal(np.array(refused), ~np.isfinite(every.astype(np.float32)))


@pytest.mark.parametrize("outtype", ["bf16", "q8_0"])
def test_infinity_late_in_a_float16_tensor_is_refused(make_tiny_llama: Callable[..., Path], tmp_path: Path,
                                                      outtype: str) -> None:
    """F16 → bf16/q8_0 is widened and checked a span at a time: a value in the last span is seen too."""
    from safetensors.numpy import load_file, save_file

    model = make_tiny_llama("bpe", name="m", dtype="float16", seed=6)
    weights = model / "model.safetensors"
    tensors = load_file(str(weights))
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name].reshape(-1)[-1] = np.float16(np.inf)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(InputFileError, match=name.replace(".", r"\.")):
        convert_hf_to_gguf(model, outtype, out_dir / "o.gguf", progress=False)
    assert list(out_dir.iterdir()) == []
