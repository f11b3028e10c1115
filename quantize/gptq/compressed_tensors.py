"""The compressed-tensors "pack-quantized" layout of one GPTQ linear (what llm-compressor writes, vLLM reads).

The same integer codes, scales and zeros as the v1 layout (:mod:`quantmill.quantize.gptq.packing`),
stored the compressed-tensors way (W4A16 / W8A16 "pack-quantized", compressed-tensors 0.18):

* ``weight_packed`` int32 (out_features, in_features·bits/32): the codes packed along the input
  dimension, 32 values in ``bits`` words, value j at bit ``bits·j`` (least significant first).
  compressed-tensors works on signed codes ``q - 2^(bits-1)`` and packs them with that offset
  added back, so the stored unsigned value is quantmill's code itself.
* ``weight_scale`` float16 (out_features, groups).
* ``weight_zero_point`` (asymmetric branches only) int32 (out_features·bits/32, groups): the
  unsigned zero ``z`` packed along the output dimension (compressed-tensors' zero point is the
  signed ``z - 2^(bits-1)``). A symmetric branch's zero is ``2^(bits-1)``: signed zero 0, not stored.
* ``weight_g_idx`` int32 (in_features,), only when act-order made the groups non-contiguous
  (``actorder: group``); with contiguous groups (no act-order, or static groups) it is omitted and
  the config says ``actorder: weight`` or null.
* ``weight_shape`` int64 (2,): ``[out_features, in_features]``.

Dequantized weight: ``W[o, i] = weight_scale[o, g] · (code[o, i] - z[o, g])``, ``g = g_idx[i]``:
bit for bit the v1 branch's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from quantmill.quantize.gptq.packing import pack_rows, unpack_rows

FORMAT = "pack-quantized"
QUANT_METHOD = "compressed-tensors"
COMPRESSED_TENSORS_VERSION = "0.18.0"  # the version whose format this writes (actorder "group" still loads)
TENSOR_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape")


@dataclass(frozen=True)
class CompressedLinear:
    """The stored tensors of one linear in the pack-quantized layout (numpy, storage dtypes)."""

    weight_packed: np.ndarray  # int32 (out, in·bits/32)
    weight_scale: np.ndarray  # float16 (out, groups)
    weight_zero_point: np.ndarray | None  # int32 (out·bits/32, groups), asymmetric only
    weight_g_idx: np.ndarray | None  # int32 (in,), non-contiguous groups only
    weight_shape: np.ndarray  # int64 (2,)
    bits: int

    def tensors(self, prefix: str) -> dict[str, np.ndarray]:
        """Checkpoint name -> array, e.g. ``model.layers.0.mlp.up_proj.weight_packed``."""
        return {f"{prefix}.{suffix}": value for suffix in TENSOR_SUFFIXES
                if isinstance(value := getattr(self, suffix), np.ndarray)}


def contiguous_groups(g_idx: np.ndarray, n_groups: int) -> bool:
    """True when column i belongs to group i // group_size (the order compressed-tensors assumes)."""
    n = g_idx.shape[0]
    if n_groups <= 1:
        return bool((g_idx == 0).all())
    size = n // n_groups
    return n % n_groups == 0 and bool((g_idx == np.arange(n) // size).all())


def pack_compressed(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, g_idx: np.ndarray, bits: int,
                    *, sym: bool) -> CompressedLinear:
    """codes (out, in) in [0, maxq]; scales (groups, out) float16-exact; zeros (groups, out)."""
    out_features, in_features = codes.shape
    half = 1 << (bits - 1)
    if sym and zeros.size and not (zeros == half).all():
        raise ValueError(f"a symmetric {bits}-bit branch must have every zero point at {half}")
    packed = np.ascontiguousarray(pack_rows(np.ascontiguousarray(codes.T), bits).T)
    zero_point = None if sym else pack_rows(np.ascontiguousarray(zeros.T.astype(np.int64)), bits)
    keep_g_idx = not contiguous_groups(g_idx, scales.shape[0])
    return CompressedLinear(
        weight_packed=packed,
        weight_scale=np.ascontiguousarray(scales.T, dtype=np.float16),
        weight_zero_point=None if zero_point is None else np.ascontiguousarray(zero_point),
        weight_g_idx=np.ascontiguousarray(g_idx, dtype=np.int32) if keep_g_idx else None,
        weight_shape=np.array([out_features, in_features], dtype=np.int64),
        bits=bits,
    )


def dequantize_compressed(linear: CompressedLinear, sym: bool) -> np.ndarray:
    """The float32 weight (out, in) that compressed-tensors reconstructs."""
    out_features, in_features = (int(v) for v in linear.weight_shape)
    codes = unpack_rows(np.ascontiguousarray(linear.weight_packed.T), linear.bits)[:in_features].T
    scales = linear.weight_scale.astype(np.float32)  # (out, groups)
    groups = scales.shape[1]
    if linear.weight_zero_point is None or sym:
        zeros = np.full((out_features, groups), 1 << (linear.bits - 1), dtype=np.int32)
    else:
        zeros = unpack_rows(linear.weight_zero_point, linear.bits)[:out_features]
    if linear.weight_g_idx is not None:
        g = linear.weight_g_idx.astype(np.int64)
    else:
        g = np.arange(in_features) // (in_features // groups)
    return (scales[:, g] * (codes - zeros[:, g]).astype(np.float32)).astype(np.float32)


def weight_args(bits: int, group_size: int, sym: bool, desc_act: bool, static_groups: bool,
                observer: str = "minmax") -> dict[str, Any]:
    """The ``weights`` QuantizationArgs of the branch's one config group (``observer``: minmax, or mse for a branch
    whose grids came from quantmill's clipping search; its parameters are in quantmill_gptq.json)."""
    if not desc_act:
        actorder = None
    elif static_groups or group_size == -1:
        actorder = "weight"  # quantized in activation order, groups stay contiguous: nothing to store
    else:
        actorder = "group"  # groups follow the activation order: weight_g_idx maps each column
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": sym,
        "group_size": None if group_size == -1 else group_size,
        "strategy": "channel" if group_size == -1 else "group",
        "block_structure": None,
        "dynamic": False,
        "actorder": actorder,
        "observer": observer,
        "observer_kwargs": {},
    }


def compressed_tensors_config(bits: int, group_size: int, sym: bool, desc_act: bool, static_groups: bool,
                              ignore: list[str], observer: str = "minmax") -> dict[str, Any]:
    """config.json's ``quantization_config`` of a pack-quantized W{bits}A16 checkpoint."""
    return {
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weight_args(bits, group_size, sym, desc_act, static_groups, observer),
                "input_activations": None,
                "output_activations": None,
                "format": FORMAT,
            }
        },
        "format": FORMAT,
        "global_compression_ratio": None,
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "quant_method": QUANT_METHOD,
        "quantization_status": "compressed",
        "sparsity_config": {},
        "version": COMPRESSED_TENSORS_VERSION,
    }
