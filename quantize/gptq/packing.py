"""The AutoGPTQ / GPTQModel "v1" tensor layout of one quantized linear, packed and unpacked exactly.

For a linear with ``in_features`` inputs and ``out_features`` outputs, ``groups`` groups:

* ``qweight`` int32 (in_features·bits/32, out_features): the codes packed along the input
  dimension. Each run of 32 consecutive input rows is one little-endian bit stream of
  32·bits bits (``bits`` words): value j sits at bit ``bits·j``, least significant bit first.
  For 2/4/8 bits a value never crosses a word; for 3 bits values 10 and 21 of each run do
  (32 values in 3 words).
* ``qzeros`` int32 (groups, out_features·bits/32): ``zero - 1`` packed the same way along the
  output dimension (the v1 convention: loaders add the 1 back).
* ``scales`` float16 (groups, out_features); ``g_idx`` int32 (in_features,): each input's group.

Dequantized weight (out, in): ``W[o, i] = scales[g, o] · (code[i, o] - zero[g, o])``, ``g = g_idx[i]``.
Both dimensions must be multiples of 32 (:func:`check_packable`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quantmill.errors import UnsupportedError

PACK_RUN = 32  # values per packed run; a run of b-bit values fills b int32 words
TENSOR_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


@dataclass(frozen=True)
class PackedLinear:
    """The four stored tensors of one quantized linear (numpy, storage dtypes)."""

    qweight: np.ndarray  # int32 (in·bits/32, out)
    qzeros: np.ndarray  # int32 (groups, out·bits/32)
    scales: np.ndarray  # float16 (groups, out)
    g_idx: np.ndarray  # int32 (in,)
    bits: int

    def tensors(self, prefix: str) -> dict[str, np.ndarray]:
        """Checkpoint name -> array, e.g. ``model.layers.0.mlp.up_proj.qweight``."""
        return {f"{prefix}.{suffix}": getattr(self, suffix) for suffix in TENSOR_SUFFIXES}


def check_packable(name: str, in_features: int, out_features: int) -> None:
    """The v1 layout packs runs of 32 values along both dimensions."""
    for what, size in (("input", in_features), ("output", out_features)):
        if size % PACK_RUN:
            raise UnsupportedError(
                f"{name}: {what} width {size} is not a multiple of {PACK_RUN}, which the GPTQ v1 checkpoint"
                " format needs; this layer cannot be GPTQ-quantized"
            )


def pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-bit values (n, m) along axis 0 into int32 (n·bits/32, m)."""
    n, m = values.shape
    if n % PACK_RUN:
        raise ValueError(f"cannot pack {n} rows: not a multiple of {PACK_RUN}")
    mask = (1 << bits) - 1
    if values.size and (int(values.min()) < 0 or int(values.max()) > mask):
        raise ValueError(f"values outside [0, {mask}] cannot be packed in {bits} bits")
    runs = values.reshape(n // PACK_RUN, PACK_RUN, m).astype(np.uint64)
    words = np.zeros((n // PACK_RUN, bits, m), dtype=np.uint64)
    for j in range(PACK_RUN):
        word, shift = divmod(bits * j, 32)
        words[:, word, :] |= (runs[:, j, :] << np.uint64(shift)) & np.uint64(0xFFFFFFFF)
        if shift + bits > 32:  # the value's high bits continue in the next word
            words[:, word + 1, :] |= runs[:, j, :] >> np.uint64(32 - shift)
    return words.reshape(n // PACK_RUN * bits, m).astype(np.uint32).view(np.int32)


def unpack_rows(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_rows`: int32 (n·bits/32, m) -> int32 values (n, m)."""
    rows, m = packed.shape
    if rows % bits:
        raise ValueError(f"{rows} packed rows is not a multiple of {bits}")
    words = packed.view(np.uint32).astype(np.uint64).reshape(rows // bits, bits, m)
    values = np.zeros((rows // bits, PACK_RUN, m), dtype=np.uint64)
    mask = np.uint64((1 << bits) - 1)
    for j in range(PACK_RUN):
        word, shift = divmod(bits * j, 32)
        value = words[:, word, :] >> np.uint64(shift)
        if shift + bits > 32:
            value |= words[:, word + 1, :] << np.uint64(32 - shift)
        values[:, j, :] = value & mask
    return values.reshape(rows // bits * PACK_RUN, m).astype(np.int32)


def pack_linear(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, g_idx: np.ndarray, bits: int) -> PackedLinear:
    """codes (out, in) in [0, maxq]; scales (groups, out) float16-exact; zeros (groups, out) in [1, maxq]."""
    maxq = (1 << bits) - 1
    if zeros.size and (int(zeros.min()) < 1 or int(zeros.max()) > maxq):
        raise ValueError(f"zero points must lie in [1, {maxq}] to be stored as zero - 1 in {bits} bits")
    return PackedLinear(
        qweight=pack_rows(np.ascontiguousarray(codes.T), bits),
        qzeros=np.ascontiguousarray(pack_rows(np.ascontiguousarray((zeros.astype(np.int64) - 1).T), bits).T),
        scales=np.ascontiguousarray(scales, dtype=np.float16),
        g_idx=np.ascontiguousarray(g_idx, dtype=np.int32),
        bits=bits,
    )


def unpack_linear(packed: PackedLinear) -> tuple[np.ndarray, np.ndarray]:
    """(codes (out, in), zeros (groups, out)) as int32, zeros with the v1 ``+ 1`` applied."""
    codes = unpack_rows(packed.qweight, packed.bits).T
    zeros = unpack_rows(np.ascontiguousarray(packed.qzeros.T), packed.bits).T + 1
    return np.ascontiguousarray(codes), np.ascontiguousarray(zeros)


def dequantize_linear(packed: PackedLinear) -> np.ndarray:
    """The float32 weight (out, in) that a v1 loader reconstructs."""
    codes, zeros = unpack_linear(packed)
    g = packed.g_idx.astype(np.int64)
    scales = packed.scales.astype(np.float32)
    return (scales[g].T * (codes - zeros[g].T).astype(np.float32)).astype(np.float32)
