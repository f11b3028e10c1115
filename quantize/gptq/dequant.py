"""Reading a GPTQ v1 checkpoint back: its config, its size figures, and a dequantized float model.

``load_dequantized_model(dir)`` rebuilds the plain transformers model (no quantization
backend, no remote code) with every packed linear replaced by the float32 weight a v1 loader
reconstructs; verify evaluates GPTQ branches through it, on CPU.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from quantmill.errors import InputFileError, UnsupportedError
from quantmill.jsonio import read_json_object
from quantmill.quantize.gptq.branches import SUPPORTED_BITS
from quantmill.quantize.gptq.checkpoint import BRANCH_RECORD
from quantmill.quantize.gptq.packing import TENSOR_SUFFIXES, PackedLinear, dequantize_linear

if TYPE_CHECKING:
    import torch

    from quantmill.convert.safetensors_io import Checkpoint

V1_FORMATS = ("gptq",)  # checkpoint_format values whose qzeros hold zero - 1
_FIX = "re-create the branch with quantmill quantize gptq"


def read_gptq_config(directory: Path) -> dict[str, Any]:
    """config.json's ``quantization_config`` (else quantize_config.json), checked for a v1 GPTQ checkpoint."""
    directory = Path(directory)
    config = read_json_object(directory / "config.json", _FIX)
    if (directory / BRANCH_RECORD).is_file() and _quant_method(config) == "compressed-tensors":
        return _compressed_tensors_record(directory)
    qconfig = config.get("quantization_config")
    if qconfig is None and (directory / "quantize_config.json").is_file():
        qconfig = read_json_object(directory / "quantize_config.json", _FIX)
    if not isinstance(qconfig, dict) or qconfig.get("quant_method", "gptq") != "gptq":
        raise InputFileError(directory / "config.json", "has no GPTQ quantization_config", "pass a GPTQ checkpoint directory")
    fmt = str(qconfig.get("checkpoint_format", qconfig.get("format", "gptq"))).lower()
    if fmt not in V1_FORMATS:
        raise UnsupportedError(f"{directory / 'config.json'}: checkpoint_format {fmt!r} is not supported (only the v1 'gptq' format)")
    if qconfig.get("bits") not in SUPPORTED_BITS:
        raise UnsupportedError(f"{directory / 'config.json'}: quantization_config bits {qconfig.get('bits')!r} is not supported")
    return qconfig


def _quant_method(config: dict[str, Any]) -> Any:
    qconfig = config.get("quantization_config")
    return qconfig.get("quant_method") if isinstance(qconfig, dict) else None


def _compressed_tensors_record(directory: Path) -> dict[str, Any]:
    """A quantmill compressed-tensors branch: its spec record (bits, group_size, sym, ...) with format."""
    record = read_json_object(directory / BRANCH_RECORD, _FIX)
    if record.get("bits") not in SUPPORTED_BITS or record.get("format") != "compressed-tensors":
        raise InputFileError(directory / BRANCH_RECORD, "is not a quantmill compressed-tensors branch record", _FIX)
    return {**record, "quant_method": "gptq", "checkpoint_format": "compressed-tensors"}


def is_gptq_checkpoint(path: Path) -> bool:
    """A model directory whose config.json declares GPTQ quantization (cheap: reads the JSON only)."""
    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        return False
    try:
        config = read_json_object(path / "config.json", _FIX)
    except InputFileError:
        return False
    method = _quant_method(config)
    return method == "gptq" or (method == "compressed-tensors" and (path / BRANCH_RECORD).is_file())


def quantized_prefixes(ckpt: Checkpoint) -> list[str]:
    """Module names that have a ``qweight`` (sorted)."""
    return sorted(name.removesuffix(".qweight") for name in ckpt.entries if name.endswith(".qweight"))


def read_packed(ckpt: Checkpoint, prefix: str, bits: int) -> PackedLinear:
    arrays = {}
    for suffix in TENSOR_SUFFIXES:
        name = f"{prefix}.{suffix}"
        if name not in ckpt:
            raise InputFileError(ckpt.model_dir, f"quantized module {prefix} has no {suffix} tensor", _FIX)
        arrays[suffix] = np.array(ckpt.array(name))
        ckpt.release(name)
    return PackedLinear(arrays["qweight"], arrays["qzeros"], arrays["scales"], arrays["g_idx"], bits)


def dequantized_tensors(directory: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) of the plain model: packed linears as ``<prefix>.weight``, the rest widened."""
    from quantmill.convert.safetensors_io import Checkpoint, to_float32
    from quantmill.quantize.gptq.compressed_tensors import TENSOR_SUFFIXES as CT_SUFFIXES

    qconfig = read_gptq_config(directory)
    bits = int(qconfig["bits"])
    compressed = qconfig.get("checkpoint_format") == "compressed-tensors"
    with Checkpoint(Path(directory)) as ckpt:
        if compressed:
            prefixes = sorted(n.removesuffix(".weight_packed") for n in ckpt.entries if n.endswith(".weight_packed"))
        else:
            prefixes = quantized_prefixes(ckpt)
        stored = {f"{p}.{s}" for p in prefixes for s in (CT_SUFFIXES if compressed else TENSOR_SUFFIXES)}
        for prefix in prefixes:
            weight = (_compressed_weight(ckpt, prefix, bits, bool(qconfig["sym"])) if compressed
                      else dequantize_linear(read_packed(ckpt, prefix, bits)))
            yield f"{prefix}.weight", weight
        for name, entry in ckpt.entries.items():
            if name not in stored:
                yield name, np.array(to_float32(ckpt.array(name), entry.dtype))
                ckpt.release(name)


def _compressed_weight(ckpt: Checkpoint, prefix: str, bits: int, sym: bool) -> np.ndarray:
    from quantmill.quantize.gptq.compressed_tensors import TENSOR_SUFFIXES as CT_SUFFIXES
    from quantmill.quantize.gptq.compressed_tensors import CompressedLinear, dequantize_compressed

    arrays: dict[str, np.ndarray | None] = {}
    for suffix in CT_SUFFIXES:
        name = f"{prefix}.{suffix}"
        arrays[suffix] = np.array(ckpt.array(name)) if name in ckpt else None
        if name in ckpt:
            ckpt.release(name)
    if arrays["weight_scale"] is None or arrays["weight_shape"] is None:
        raise InputFileError(ckpt.model_dir, f"quantized module {prefix} lacks weight_scale or weight_shape", _FIX)
    return dequantize_compressed(CompressedLinear(bits=bits, **arrays), sym)  # type: ignore[arg-type]


def plain_config(directory: Path) -> Any:
    """The transformers config of the checkpoint without its quantization_config (no remote code)."""
    from quantmill.convert.arch.hf_config import transformers_config

    path = Path(directory) / "config.json"
    return transformers_config(read_json_object(path, _FIX), path)


def load_dequantized_model(directory: Path, dtype: str = "float32") -> torch.nn.Module:
    """The checkpoint as a plain transformers causal LM with dequantized weights (CPU, eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    model = AutoModelForCausalLM.from_config(plain_config(directory), dtype=getattr(torch, dtype))
    state = {name: torch.from_numpy(array) for name, array in dequantized_tensors(directory)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise InputFileError(
            directory, f"tensors do not match the model (missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})", _FIX
        )
    if tied:
        model.tie_weights()
    return model.eval()


def gptq_size_figures(directory: Path) -> tuple[int, float, int]:
    """(bytes of the safetensors files, stored bits per represented weight, number of weights)."""
    from quantmill.convert.safetensors_io import DTYPES, Checkpoint

    bits = int(read_gptq_config(directory)["bits"])
    size = stored_bits = weights = 0
    with Checkpoint(Path(directory)) as ckpt:
        size = sum(p.stat().st_size for p in {e.file for e in ckpt.entries.values()})
        for name, entry in ckpt.entries.items():
            stored_bits += entry.n_elements * DTYPES[entry.dtype][1] * 8
            if name.endswith(".qweight"):
                weights += entry.shape[0] * 32 // bits * entry.shape[1]
            elif name.endswith(".weight_packed"):
                weights += entry.shape[0] * entry.shape[1] * 32 // bits
            elif not name.endswith((".qzeros", ".scales", ".g_idx", ".weight_scale", ".weight_zero_point",
                                    ".weight_g_idx", ".weight_shape")):
                weights += entry.n_elements
    return size, (stored_bits / weights if weights else 0.0), weights
