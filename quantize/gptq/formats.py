"""The checkpoint formats a GPTQ branch can be written in: one record each, chosen by the branch's ``format``.

Both formats store the same integer codes, scales and zeros from one quantization; only the tensor
layout and the config differ:

* ``gptq``: the AutoGPTQ / GPTQModel v1 layout (``qweight``/``qzeros``/``scales``/``g_idx``),
  ``quantize_config.json`` and ``quant_method: gptq`` (transformers + GPTQModel, TGI, ExLlama).
* ``compressed-tensors``: llm-compressor's W4A16 / W8A16 ``pack-quantized`` layout and
  ``quant_method: compressed-tensors`` (vLLM, transformers + compressed-tensors).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from quantmill.errors import UserInputError


class PackedTensors(Protocol):
    def tensors(self, prefix: str) -> dict[str, np.ndarray]: ...


class BranchSpec(Protocol):
    """What a format reads of a branch (:class:`quantmill.quantize.gptq.branches.BranchSpec`, which imports this module)."""

    @property
    def bits(self) -> int: ...
    @property
    def group_size(self) -> int: ...
    @property
    def sym(self) -> bool: ...
    @property
    def desc_act(self) -> bool: ...
    @property
    def static_groups(self) -> bool: ...
    @property
    def grid(self) -> str: ...

    def quantization_config(self) -> dict[str, Any]: ...
    def gptqmodel_meta(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class CheckpointFormat:
    name: str
    suffix: str  # appended to the release name ("" for the default format)
    word: str  # the short-spec word that selects it ("" for the default format)
    pack: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, BranchSpec], PackedTensors]
    config: Callable[[BranchSpec, dict[str, Any]], dict[str, Any]]  # config.json's quantization_config
    writes_quantize_config: bool  # quantize_config.json (the v1 loaders' file)


def _pack_v1(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, g_idx: np.ndarray, spec: BranchSpec) -> PackedTensors:
    from quantmill.quantize.gptq.packing import pack_linear

    return pack_linear(codes, scales, zeros, g_idx, spec.bits)


def _config_v1(spec: BranchSpec, meta: dict[str, Any]) -> dict[str, Any]:
    from quantmill import __version__

    return {**spec.quantization_config(), "meta": {"quantizer": [f"quantmill:{__version__}"], **spec.gptqmodel_meta(), **meta}}


def _pack_ct(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, g_idx: np.ndarray, spec: BranchSpec) -> PackedTensors:
    from quantmill.quantize.gptq.compressed_tensors import pack_compressed

    return pack_compressed(codes, scales, zeros, g_idx, spec.bits, sym=spec.sym)


def _config_ct(spec: BranchSpec, meta: dict[str, Any]) -> dict[str, Any]:
    from quantmill.quantize.gptq.compressed_tensors import compressed_tensors_config

    return compressed_tensors_config(spec.bits, spec.group_size, spec.sym, spec.desc_act, spec.static_groups,
                                     ignore=["lm_head"], observer=spec.grid)


DEFAULT_FORMAT = "gptq"
FORMATS: dict[str, CheckpointFormat] = {}


def register(fmt: CheckpointFormat) -> None:
    if fmt.name in FORMATS:
        raise ValueError(f"checkpoint format {fmt.name!r} registered twice")
    FORMATS[fmt.name] = fmt


register(CheckpointFormat("gptq", "", "", _pack_v1, _config_v1, writes_quantize_config=True))
register(CheckpointFormat("compressed-tensors", "-compressed-tensors", "ct", _pack_ct, _config_ct,
                          writes_quantize_config=False))
FORMAT_WORDS = {f.word: f.name for f in FORMATS.values() if f.word}


def checkpoint_format(name: str) -> CheckpointFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise UserInputError(f"GPTQ format {name!r} is not known; choose one of {', '.join(FORMATS)}") from None
