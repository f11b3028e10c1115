"""bitsandbytes 4-bit base checkpoints: detection, the 16-bit original's name, dequantization.

Merging a LoRA into the dequantized weights of a 4-bit base bakes the 4-bit rounding
error into the "16-bit" result, so the merge asks for the 16-bit original instead and
names it. Only with an explicit flag does it dequantize: NF4/FP4 blocks (two 4-bit codes
per byte, high nibble first) times their per-block absmax; with double quantization the
absmax values are themselves 8-bit codes times a per-256-block scale plus an offset. The
result is rounded to the checkpoint's compute dtype, as bitsandbytes' own dequantization
does, and merged from there.
"""
from __future__ import annotations

import json
import re
from math import prod
from typing import TYPE_CHECKING, Any

from quantmill.errors import InputFileError

if TYPE_CHECKING:
    import torch

    from quantmill.convert.safetensors_io import Checkpoint

QUANT_STATE_PREFIX = ".quant_state.bitsandbytes__"
QUANT_TYPES = ("nf4", "fp4")
COMPANION_SUFFIXES: tuple[str, ...] = (
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    *(QUANT_STATE_PREFIX + q for q in QUANT_TYPES),
)

# Quantized uploads whose 16-bit original has another name (checked first, exact match).
KNOWN_ORIGINALS: dict[str, str] = {
    "unsloth/llama-3-8b-bnb-4bit": "meta-llama/Meta-Llama-3-8B",
    "unsloth/llama-3-8b-Instruct-bnb-4bit": "meta-llama/Meta-Llama-3-8B-Instruct",
    "unsloth/llama-3-70b-bnb-4bit": "meta-llama/Meta-Llama-3-70B",
    "unsloth/llama-2-7b-bnb-4bit": "meta-llama/Llama-2-7b-hf",
    "unsloth/llama-2-7b-chat-bnb-4bit": "meta-llama/Llama-2-7b-chat-hf",
    "unsloth/llama-2-13b-bnb-4bit": "meta-llama/Llama-2-13b-hf",
    "unsloth/codellama-7b-bnb-4bit": "codellama/CodeLlama-7b-hf",
    "unsloth/mistral-7b-bnb-4bit": "mistralai/Mistral-7B-v0.1",
    "unsloth/mistral-7b-v0.2-bnb-4bit": "mistral-community/Mistral-7B-v0.2",
    "unsloth/mistral-7b-v0.3-bnb-4bit": "mistralai/Mistral-7B-v0.3",
    "unsloth/mistral-7b-instruct-v0.1-bnb-4bit": "mistralai/Mistral-7B-Instruct-v0.1",
    "unsloth/mistral-7b-instruct-v0.2-bnb-4bit": "mistralai/Mistral-7B-Instruct-v0.2",
    "unsloth/mistral-7b-instruct-v0.3-bnb-4bit": "mistralai/Mistral-7B-Instruct-v0.3",
    "unsloth/tinyllama-bnb-4bit": "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
    "unsloth/tinyllama-chat-bnb-4bit": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "unsloth/gemma-2b-bnb-4bit": "google/gemma-2b",
    "unsloth/gemma-7b-bnb-4bit": "google/gemma-7b",
    "unsloth/gemma-2b-it-bnb-4bit": "google/gemma-2b-it",
    "unsloth/gemma-7b-it-bnb-4bit": "google/gemma-7b-it",
    "unsloth/Phi-3-mini-4k-instruct-bnb-4bit": "microsoft/Phi-3-mini-4k-instruct",
    "unsloth/zephyr-sft-bnb-4bit": "HuggingFaceH4/mistral-7b-sft-beta",
}
# Family rules for names not in the table: (regex on the quantized name, 16-bit original).
# Unsloth's "-unsloth-bnb-4bit" (dynamic) and "-bnb-4bit" uploads mirror the vendor's names.
ORIGINAL_RULES: tuple[tuple[str, str], ...] = (
    (r"^unsloth/((?:Meta-)?Llama-[0-9].*?)(?:-unsloth)?-bnb-4bit$", r"meta-llama/\1"),
    (r"^unsloth/(Qwen[0-9].*?|QwQ-.*?)(?:-unsloth)?-bnb-4bit$", r"Qwen/\1"),
    (r"^unsloth/((?:Mistral|Mixtral|Ministral)-.*?)(?:-unsloth)?-bnb-4bit$", r"mistralai/\1"),
    (r"^unsloth/(gemma-.*?)(?:-unsloth)?-bnb-4bit$", r"google/\1"),
    (r"^unsloth/(Phi-.*?|phi-.*?)(?:-unsloth)?-bnb-4bit$", r"microsoft/\1"),
    (r"^unsloth/(SmolLM2?-.*?)(?:-unsloth)?-bnb-4bit$", r"HuggingFaceTB/\1"),
    (r"^unsloth/(DeepSeek-R1-Distill-.*?)(?:-unsloth)?-bnb-4bit$", r"deepseek-ai/\1"),
    (r"^([^/]+)/(.+?)(?:-unsloth)?-bnb-4bit$", r"\1/\2"),
)
BNB_SUFFIX = re.compile(r"(?:-unsloth)?-bnb-4bit$")


def original_name(model_id: str) -> str | None:
    """The 16-bit original of a ``...-bnb-4bit`` upload, or None if the name is not one."""
    if model_id in KNOWN_ORIGINALS:
        return KNOWN_ORIGINALS[model_id]
    for pattern, replacement in ORIGINAL_RULES:
        if re.match(pattern, model_id):
            return re.sub(pattern, replacement, model_id)
    return None


def quantization_config(config: dict[str, Any]) -> dict[str, Any] | None:
    """The base's bitsandbytes 4-bit ``quantization_config``, or None for any other base."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        return None
    if str(qc.get("quant_method", "bitsandbytes")).lower() != "bitsandbytes":
        return None
    return qc if qc.get("load_in_4bit") or qc.get("_load_in_4bit") else None


def is_bnb_4bit(config: dict[str, Any], tensor_names: list[str]) -> bool:
    return quantization_config(config) is not None or any(QUANT_STATE_PREFIX in n for n in tensor_names)


def describe_original(candidates: list[str]) -> str:
    """"the 16-bit original (NAME)" for the first candidate name that maps, else a generic hint."""
    for candidate in candidates:
        name = original_name(candidate)
        if name is not None:
            mirror = BNB_SUFFIX.sub("", candidate)
            also = f" (or its 16-bit mirror {mirror})" if mirror != name else ""
            return f"the 16-bit original {name}{also}"
    return "the 16-bit original model the 4-bit checkpoint was quantized from"


def quantized_weights(names: list[str]) -> dict[str, str]:
    """weight name -> quant type, for every 4-bit packed weight in a checkpoint."""
    found: dict[str, str] = {}
    for name in names:
        if QUANT_STATE_PREFIX in name:
            weight, _, quant_type = name.partition(QUANT_STATE_PREFIX)
            found[weight] = quant_type
    return dict(sorted(found.items()))


def is_companion(name: str, quantized: dict[str, str]) -> bool:
    """True for the absmax / quant map / quant state tensors that travel with a packed weight."""
    for suffix in COMPANION_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in quantized:
            return True
    return False


def _tensor(ckpt: Checkpoint, name: str, weight: str) -> torch.Tensor:
    import torch

    if name not in ckpt:
        raise InputFileError(ckpt.model_dir, f"4-bit weight {weight!r} has no {name[len(weight):]!r} tensor", "re-download the checkpoint")
    return torch.from_numpy(ckpt.array(name).copy())


def quant_state(ckpt: Checkpoint, weight: str, quant_type: str) -> dict[str, Any]:
    raw = ckpt.array(f"{weight}{QUANT_STATE_PREFIX}{quant_type}").tobytes()
    try:
        state = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFileError(ckpt.model_dir, f"quant state of {weight!r} is not valid JSON ({exc})", "re-download the checkpoint") from exc
    if not isinstance(state, dict) or "shape" not in state or "blocksize" not in state:
        raise InputFileError(ckpt.model_dir, f"quant state of {weight!r} lacks shape/blocksize", "re-download the checkpoint")
    return state


def _blockwise(codes: torch.Tensor, code_map: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """code_map[codes] times the absmax of each run of ``blocksize`` values (float32)."""
    import torch

    values = code_map.to(torch.float32)[codes.to(torch.int64)]
    n = values.numel()
    block_of = torch.arange(n) // blocksize
    return values * absmax.to(torch.float32)[block_of]


def dequantize_4bit(ckpt: Checkpoint, weight: str, quant_type: str) -> tuple[torch.Tensor, str]:
    """The float32 values of a packed 4-bit weight (rounded to its compute dtype) and that dtype's name."""
    import torch

    state = quant_state(ckpt, weight, quant_type)
    shape = tuple(int(d) for d in state["shape"])
    packed = torch.from_numpy(ckpt.array(weight).copy()).view(torch.uint8).reshape(-1)
    codes = torch.empty(packed.numel() * 2, dtype=torch.uint8)
    codes[0::2] = packed >> 4
    codes[1::2] = packed & 0xF
    n = prod(shape)
    if codes.numel() < n:
        raise InputFileError(
            ckpt.model_dir, f"4-bit weight {weight!r} holds {codes.numel()} values, its shape {list(shape)} needs {n}", "re-download the checkpoint"
        )
    absmax = _tensor(ckpt, f"{weight}.absmax", weight)
    if "nested_blocksize" in state:
        absmax = _blockwise(
            absmax, _tensor(ckpt, f"{weight}.nested_quant_map", weight), _tensor(ckpt, f"{weight}.nested_absmax", weight),
            int(state["nested_blocksize"])
        ) + float(state.get("nested_offset", 0.0))
    values = _blockwise(codes[:n], _tensor(ckpt, f"{weight}.quant_map", weight), absmax, int(state["blocksize"]))
    dtype = str(state.get("dtype", "float16"))
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(dtype)
    if torch_dtype is None:
        raise InputFileError(ckpt.model_dir, f"4-bit weight {weight!r} has compute dtype {dtype!r}", "expected float16, bfloat16 or float32")
    return values.reshape(shape).to(torch_dtype).to(torch.float32), dtype
