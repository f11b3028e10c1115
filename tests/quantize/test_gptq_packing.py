"""GPTQ v1 packing: exact round trips, and the bit layout that AutoGPTQ/GPTQModel loaders read."""
from __future__ import annotations

import numpy as np
import pytest

from quantmill.errors import UnsupportedError
from quantmill.quantize.gptq.packing import (
    PackedLinear,
    check_packable,
    dequantize_linear,
    pack_linear,
    pack_rows,
    unpack_linear,
    unpack_rows,
)

BITS = (2, 3, 4, 8)


def reference_pack_column(values: list[int], bits: int) -> list[int]:
    """Pack one column of ``values`` word by word, the way the v1 layout is specified.

    2/4/8 bits: ``32 // bits`` values per word, value k of a word at bit ``bits * k``.
    3 bits: per 32 values three words; word 0 holds values 0-9 at 3k and the low 2 bits of
    value 10 at bit 30; word 1 holds value 10's high bit at bit 0, values 11-20 at 3k + 1 and
    the low bit of value 21 at bit 31; word 2 holds value 21's high 2 bits at bits 0-1 and
    values 22-31 at 3k + 2.
    """
    words: list[int] = []
    if bits != 3:
        per = 32 // bits
        for start in range(0, len(values), per):
            word = 0
            for k, v in enumerate(values[start : start + per]):
                word |= v << (bits * k)
            words.append(word)
        return words
    for s in range(0, len(values), 32):
        v = values[s : s + 32]
        w0 = sum(v[k] << (3 * k) for k in range(10)) | ((v[10] & 0b11) << 30)
        w1 = (v[10] >> 2) | sum(v[11 + k] << (3 * k + 1) for k in range(10)) | ((v[21] & 1) << 31)
        w2 = (v[21] >> 1) | sum(v[22 + k] << (3 * k + 2) for k in range(10))
        words += [w0, w1, w2]
    return words


def as_signed(word: int) -> int:
    return word - (1 << 32) if word >= 1 << 31 else word


@pytest.mark.parametrize("bits", BITS)
def test_pack_rows_matches_the_reference_layout(bits: int) -> None:
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 1 << bits, size=(64, 3))
    packed = pack_rows(values, bits)
    assert packed.dtype == np.int32 and packed.shape == (64 * bits // 32, 3)
    for col in range(3):
        expected = [as_signed(w) for w in reference_pack_column([int(v) for v in values[:, col]], bits)]
        assert packed[:, col].tolist() == expected


def test_known_4bit_and_3bit_words() -> None:
    four = pack_rows(np.arange(32).reshape(32, 1) % 16, 4)
    assert [w & 0xFFFFFFFF for w in four[:, 0].tolist()] == [0x76543210, 0xFEDCBA98, 0x76543210, 0xFEDCBA98]
    three = pack_rows(np.full((32, 1), 7), 3)  # all ones: 96 set bits
    assert [w & 0xFFFFFFFF for w in three[:, 0].tolist()] == [0xFFFFFFFF] * 3


@pytest.mark.parametrize("bits", BITS)
def test_unpack_inverts_pack(bits: int) -> None:
    rng = np.random.default_rng(10 + bits)
    values = rng.integers(0, 1 << bits, size=(96, 40))
    assert np.array_equal(unpack_rows(pack_rows(values, bits), bits), values)


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        pack_rows(np.zeros((33, 1), dtype=np.int64), 4)
    with pytest.raises(ValueError):
        pack_rows(np.full((32, 1), 16), 4)
    with pytest.raises(ValueError):  # zero 0 cannot be stored as zero - 1
        pack_linear(np.zeros((32, 32), np.uint8), np.ones((1, 32), np.float16), np.zeros((1, 32), np.int32),
                    np.zeros(32, np.int32), 4)
    with pytest.raises(UnsupportedError, match="multiple of 32"):
        check_packable("model.layers.0.mlp.down_proj.weight", 48, 64)


@pytest.mark.parametrize("bits", BITS)
def test_linear_round_trip_and_dequantization(bits: int) -> None:
    rng = np.random.default_rng(bits)
    out_f, in_f, groups = 64, 96, 3
    maxq = (1 << bits) - 1
    codes = rng.integers(0, maxq + 1, size=(out_f, in_f)).astype(np.uint8)
    zeros = rng.integers(1, maxq + 1, size=(groups, out_f)).astype(np.int32)
    scales = rng.uniform(0.001, 0.1, size=(groups, out_f)).astype(np.float16)
    g_idx = rng.permutation(np.arange(in_f) // 32).astype(np.int32)
    packed = pack_linear(codes, scales, zeros, g_idx, bits)
    assert packed.qweight.shape == (in_f * bits // 32, out_f)
    assert packed.qzeros.shape == (groups, out_f * bits // 32)
    assert packed.scales.dtype == np.float16 and packed.g_idx.dtype == np.int32
    got_codes, got_zeros = unpack_linear(packed)
    assert np.array_equal(got_codes, codes) and np.array_equal(got_zeros, zeros)
    # stored zeros are zero - 1 (the v1 convention)
    assert np.array_equal(unpack_rows(np.ascontiguousarray(packed.qzeros.T), bits).T, zeros - 1)
    weight = dequantize_linear(packed)
    expected = np.empty((out_f, in_f), np.float64)
    for o in range(out_f):
        for i in range(in_f):
            g = g_idx[i]
            expected[o, i] = float(scales[g, o]) * (int(codes[o, i]) - int(zeros[g, o]))
    assert np.array_equal(weight.astype(np.float64), expected)
    names = sorted(PackedLinear(packed.qweight, packed.qzeros, packed.scales, packed.g_idx, bits).tensors("m.q"))
    assert names == ["m.q.g_idx", "m.q.qweight", "m.q.qzeros", "m.q.scales"]
