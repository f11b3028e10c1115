"""ggml's C conversions and quantizers give exactly the bytes of gguf-py's numpy ones (which llama.cpp's converter uses)."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from quantmill.convert import ggml_quants
from quantmill.convert.safetensors_io import to_float32

Q = gguf.GGMLQuantizationType


def _hard_rows() -> np.ndarray:
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((64, 256)) * 0.02).astype(np.float32)
    rows[0] = 0.0  # all-zero block: scale 0
    rows[1, :32] = 1e-9
    rows[2, :32] = -1e-30  # scale underflows in f16
    below_half = np.float32(0.5) - np.float32(2.0**-25)
    rows[3, :32] = np.linspace(-127, 127, 32, dtype=np.float32)  # amax 127: scale exactly 1, values k + 0.5 ...
    rows[3, 5:11] = [127, 0.5, 2.5, -0.5, below_half, -below_half]  # ... ties round away from zero, 0.49999997 does not
    rows[4] = rng.standard_normal(256).astype(np.float32) * 6e4  # f16 scale near its largest finite value
    return rows


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1.0, 1e3])
def test_q8_0_bytes_equal_gguf_py(scale: float) -> None:
    rng = np.random.default_rng(1)
    data = (rng.standard_normal((96, 1024)) * scale).astype(np.float32)
    data[:8] = _hard_rows()[:8, :].repeat(4, axis=1)
    ours = ggml_quants.quantize(data, Q.Q8_0)
    assert ours.dtype == np.uint8 and ours.shape == (96, 1024 // 32 * 34)
    assert np.array_equal(ours, gguf.quants.quantize(data, Q.Q8_0))


def test_q8_0_three_dimensional_and_fallback() -> None:
    data = _hard_rows().reshape(4, 16, 256)
    assert np.array_equal(ggml_quants.quantize(data, Q.Q8_0), gguf.quants.quantize(data, Q.Q8_0))
    # types without a native kernel go through gguf-py unchanged
    assert np.array_equal(ggml_quants.quantize(data, Q.F16), gguf.quants.quantize(data, Q.F16))
    assert ggml_quants._quantize_chunk() is not None, "libggml from llama-cpp-python must load here"


def test_bf16_bytes_equal_gguf_py() -> None:
    """float32 → bf16 (round to nearest even, ties, subnormals, overflow to inf) exactly as gguf-py's numpy."""
    rng = np.random.default_rng(2)
    bits = rng.integers(0, 2**32, size=(64, 4096), dtype=np.uint64).astype(np.uint32)
    data = np.where(np.isfinite(bits.view(np.float32)), bits, np.uint32(0x3F808000)).view(np.float32)  # finite only
    data[0, :6] = np.array([0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x00000001, 0x80000000, 0x3F80FFFF], np.uint32).view(np.float32)
    ours = ggml_quants.quantize(data, Q.BF16)
    assert ours.dtype == np.uint8 and ours.shape == (64, 4096 * 2)
    assert np.array_equal(ours, gguf.quants.quantize(data, Q.BF16))


@pytest.mark.parametrize("shape", [(65536,), (3, 7), (1, 1), (0, 16)])
def test_float16_widening_is_exact(shape: tuple[int, ...]) -> None:
    every = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)  # every bit pattern, inf included
    every = every[~np.isnan(every)]  # NaN payloads may differ (ggml quiets them); the converter refuses NaN anyway
    rows = every if shape == (65536,) else every[np.random.default_rng(3).permutation(every.size)[: int(np.prod(shape))]].reshape(shape)
    ours = ggml_quants.widen_rows(rows, "F16")
    assert ours.dtype == np.float32 and ours.shape == rows.shape
    assert np.array_equal(ours.view(np.uint32), rows.astype(np.float32).view(np.uint32))
    assert np.isnan(ggml_quants.widen_rows(np.full(5, np.nan, np.float16), "F16")).all()
    assert ggml_quants._widener("F16") is not None, "libggml-cpu from llama-cpp-python must load here"


def _every_value(dtype: str) -> np.ndarray:
    """Every non-NaN bit pattern of a 16-bit float (infinities included), as stored in safetensors."""
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    if dtype == "F16":
        values = bits.view(np.float16)
        return values[~np.isnan(values)]
    return bits[~np.isnan((bits.astype(np.uint32) << 16).view(np.float32))]  # BF16: stored as uint16


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32"])
@pytest.mark.parametrize("qtype", [Q.BF16, Q.Q8_0])
def test_encode_in_spans_gives_gguf_py_bytes(dtype: str, qtype: Q) -> None:
    """Stored rows → bytes through the per-span path, across span boundaries and into a larger ``out``:
    exactly ``gguf.quants.quantize`` of the float32 widening (llama.cpp's converter's computation)."""
    rng = np.random.default_rng(4)
    if dtype == "F32":
        n = 3 * ggml_quants.SPAN + 4096
        stored = (rng.standard_normal(n) * 10.0 ** rng.integers(-40, 37, n)).astype(np.float32)  # subnormal to huge
    else:
        every = _every_value(dtype)
        if qtype == Q.Q8_0:  # an infinite block scale is NaN, whose payload may differ; the converter refuses inf anyway
            every = every[np.isfinite(to_float32(every, dtype))]
        copies = 5 * ggml_quants.SPAN // (2 * every.size)
        stored = np.concatenate([every, *(every[rng.permutation(every.size)] for _ in range(copies))])
    stored = stored[: stored.size // 256 * 256].reshape(-1, 256)  # rows of whole Q8_0 blocks, several spans in all
    assert stored.size > 2 * ggml_quants.SPAN and stored.size % ggml_quants.SPAN
    want = gguf.quants.quantize(to_float32(stored, dtype), qtype)
    assert np.array_equal(ggml_quants.encode(stored, dtype, qtype), want)
    out = np.full(want.nbytes + 100, 0xAB, np.uint8)
    got = ggml_quants.encode(stored, dtype, qtype, out=out)
    assert np.shares_memory(got, out) and np.array_equal(got, want) and (out[want.nbytes:] == 0xAB).all()


def test_encode_check_sees_every_widened_value_and_can_stop_it() -> None:
    rows = (np.arange(5 * ggml_quants.SPAN // 2) % 2048).astype(np.float16).reshape(-1, 64)
    seen: list[np.ndarray] = []
    ggml_quants.encode(rows, "F16", Q.BF16, check=lambda values: seen.append(values.copy()))
    assert len(seen) == 3 and np.array_equal(np.concatenate(seen), rows.reshape(-1).astype(np.float32))

    def refuse_last(values: np.ndarray) -> None:
        if not np.isfinite(values).all():
            raise ValueError("non-finite")

    rows.reshape(-1)[-1] = np.inf  # in the last span only
    with pytest.raises(ValueError, match="non-finite"):
        ggml_quants.encode(rows, "F16", Q.BF16, check=refuse_last)
