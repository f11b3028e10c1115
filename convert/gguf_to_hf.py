"""GGUF -> Hugging Face checkpoint: dequantized safetensors, config, tokenizer, chat template.

Tensors are dequantized with gguf-py one at a time, renamed to Hugging Face names, the
Q/K rows put back in Hugging Face's rotary order (llama.cpp permutes them when it writes a
llama-architecture GGUF), cast to the requested dtype and streamed into one safetensors file
whose header is computed up front. Every output file is written deterministically into a
temporary directory that replaces ``out_dir`` only when complete.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantmill.atomic import atomic_dir
from quantmill.convert.arch import for_gguf
from quantmill.convert.arch.base import Architecture, GgufToHfSpec
from quantmill.convert.gguf_reader import GGUFFile
from quantmill.convert.gguf_tokenizer import GGUFVocab, tokenizer_files, vocab_from_gguf
from quantmill.convert.safetensors_io import FLOAT_CODES, SINGLE_NAME, OutputTensor, write_checkpoint
from quantmill.errors import InputFileError, UnsupportedError, UserInputError
from quantmill.outputs import check_output, safetensors_metadata

_LAYER_NAME = re.compile(r"blk\.(\d+)\.(.+)")
OUTPUT_MARKER_KEY = "quantmill"  # in model.safetensors' __metadata__: marks an earlier gguf-to-hf output
OUTPUT_MARKER = "gguf-to-hf"


# ---------------------------------------------------------------------------- Q/K row order
def unpermute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation (per head: interleaved pairs -> two halves)."""
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise UnsupportedError(f"cannot un-permute {rows} rows over {n_head} heads; the GGUF's head counts disagree")
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def permute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation (Hugging Face order -> GGUF order); the inverse of unpermute_rows."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# ---------------------------------------------------------------------------------- config
def _rope_parameters(gguf_file: GGUFFile, arch: str, theta: float) -> dict[str, Any]:
    kind = gguf_file.get_str(f"{arch}.rope.scaling.type", "none")
    if gguf_file.has_tensor("rope_freqs.weight"):
        raise UnsupportedError(
            f"{gguf_file.path}: has a rope_freqs tensor (llama3-style RoPE scaling), which GGUF -> HF cannot "
            "restore; start from the original Hugging Face checkpoint"
        )
    if kind == "none":
        return {"rope_theta": theta, "rope_type": "default"}
    if kind == "linear":
        factor = gguf_file.get_float(f"{arch}.rope.scaling.factor")
        if factor is None:
            raise InputFileError(gguf_file.path, f"{arch}.rope.scaling.factor is missing", "re-create the GGUF")
        return {"factor": factor, "rope_theta": theta, "rope_type": "linear"}
    raise UnsupportedError(
        f"{gguf_file.path}: RoPE scaling type {kind!r} is not supported by GGUF -> HF (only none and linear); "
        "start from the original Hugging Face checkpoint"
    )


def build_config(gguf_file: GGUFFile, vocab: GGUFVocab, dtype: str) -> dict[str, Any]:
    arch_name = gguf_file.architecture
    spec = _architecture(gguf_file)
    key = f"{arch_name}."
    hidden = gguf_file.require_int(key + "embedding_length")
    heads = gguf_file.require_int(key + "attention.head_count")
    kv_heads = gguf_file.get_int(key + "attention.head_count_kv", heads)
    head_dim = gguf_file.get_int(key + "attention.key_length", hidden // heads)
    rot_dim = gguf_file.get_int(key + "rope.dimension_count", head_dim)
    if rot_dim != head_dim:
        raise UnsupportedError(
            f"{gguf_file.path}: partial rotary embedding ({rot_dim} of {head_dim} dims) is not a llama model; "
            "convert a model with full rotary embeddings"
        )
    theta = gguf_file.get_float(key + "rope.freq_base", 10000.0)
    embed_rows = gguf_file.tensor_info("token_embd.weight").shape[0]
    if embed_rows != len(vocab.tokens):
        raise InputFileError(
            gguf_file.path,
            f"the vocabulary has {len(vocab.tokens)} tokens but token_embd.weight has {embed_rows} rows",
            "re-create the GGUF with its full tokenizer",
        )
    eos: int | list[int] | None = vocab.eos_id
    if vocab.eot_id is not None and vocab.eot_id != vocab.eos_id and vocab.eos_id is not None:
        eos = [vocab.eos_id, vocab.eot_id]
    return {
        "architectures": [spec.hf_class],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": vocab.bos_id,
        "dtype": dtype,
        "eos_token_id": eos,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": gguf_file.require_int(key + "feed_forward_length"),
        "max_position_embeddings": gguf_file.get_int(key + "context_length", 2048),
        "mlp_bias": False,
        "model_type": spec.model_type,
        "num_attention_heads": heads,
        "num_hidden_layers": gguf_file.require_int(key + "block_count"),
        "num_key_value_heads": kv_heads,
        "pad_token_id": vocab.pad_id,
        "pretraining_tp": 1,
        "rms_norm_eps": gguf_file.get_float(key + "attention.layer_norm_rms_epsilon", 1e-6),
        "rope_parameters": _rope_parameters(gguf_file, arch_name, theta),
        "tie_word_embeddings": not gguf_file.has_tensor("output.weight"),
        "torch_dtype": dtype,
        "use_cache": True,
        "vocab_size": embed_rows,
    }


def build_generation_config(config: dict[str, Any]) -> dict[str, Any]:
    return {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if config[key] is not None}


def _record(gguf_file: GGUFFile) -> Architecture:
    arch = for_gguf(gguf_file.architecture, gguf_file.keys(), gguf_file.path)
    arch.require("gguf-to-hf", gguf_file.path)
    return arch


def _architecture(gguf_file: GGUFFile) -> GgufToHfSpec:
    spec = _record(gguf_file).gguf_to_hf
    assert spec is not None
    return spec


# --------------------------------------------------------------------------------- tensors
@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: where it comes from and how to fix its rows."""

    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]
    permute_heads: int | None


def hf_names_by_gguf_name(gguf_file: GGUFFile, config: dict[str, Any]) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face name, derived from gguf-py's TensorNameMap.

    The HF names are the state-dict keys of transformers' own class for ``config`` (built on the
    meta device: no memory); gguf-py's map names each of them in GGUF.
    """
    import gguf
    import torch

    arch = _record(gguf_file)
    spec = arch.gguf_to_hf
    assert spec is not None
    model_class = spec.model_class()
    with torch.device("meta"):
        model = model_class(model_class.config_class.from_dict(config))
    name_map = gguf.get_tensor_name_map(arch.gguf_arch, int(config["num_hidden_layers"]))
    names: dict[str, str] = {}
    for hf_name in sorted(model.state_dict()):
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UnsupportedError(f"{gguf_file.path}: gguf-py has no GGUF name for {spec.hf_class} tensor {hf_name!r}")
        names.setdefault(gguf_name, hf_name)  # tied lm_head comes after embed_tokens: the GGUF has no output.weight
    return names


def plan_tensors(gguf_file: GGUFFile, config: dict[str, Any]) -> list[TensorPlan]:
    """Every GGUF tensor mapped to its Hugging Face name, sorted by that name."""
    spec = _architecture(gguf_file)
    hf_names = hf_names_by_gguf_name(gguf_file, config)
    plans = []
    for info in gguf_file.tensor_infos():
        hf_name = hf_names.get(info.name)
        if hf_name is None:
            raise UnsupportedError(
                f"{gguf_file.path}: tensor {info.name} has no Hugging Face {spec.hf_class} equivalent; "
                f"this GGUF is not a plain {spec.model_type} model"
            )
        match = _LAYER_NAME.fullmatch(info.name)
        heads_field = spec.permuted_rows.get(match.group(2)) if match else None
        heads = int(config[heads_field]) if heads_field else None
        plans.append(TensorPlan(hf_name, info.name, info.shape, heads))
    return sorted(plans, key=lambda p: p.hf_name)


def hf_tensor(gguf_file: GGUFFile, plan: TensorPlan) -> np.ndarray:
    """The tensor as float32 in Hugging Face layout (dequantized, Q/K rows un-permuted)."""
    values = gguf_file.dequantize(plan.gguf_name)
    if plan.permute_heads is not None:
        values = unpermute_rows(values, plan.permute_heads)
    return values


def _cast_bytes(values: np.ndarray, dtype: str) -> bytes:
    """Little-endian bytes of ``values`` rounded (to nearest even) to ``dtype``."""
    if dtype == "bfloat16":
        import torch

        tensor = torch.tensor(np.ascontiguousarray(values), dtype=torch.float32).to(torch.bfloat16)
        return tensor.view(torch.int16).numpy().astype("<i2", copy=False).tobytes()
    return np.ascontiguousarray(values, dtype={"float16": "<f2", "float32": "<f4"}[dtype]).tobytes()


def _progress(enabled: bool) -> Callable[[Iterable[OutputTensor]], Iterable[OutputTensor]]:
    from tqdm import tqdm

    return lambda tensors: tqdm(tensors, desc="gguf -> hf", unit="tensor", disable=not enabled, leave=False)


# ------------------------------------------------------------------------------- top level
def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float16", progress: bool = True) -> Path:
    """Convert ``gguf_path`` into a Hugging Face checkpoint directory ``out_dir``; returns ``out_dir``."""
    if dtype not in FLOAT_CODES:
        raise UserInputError(f"--dtype {dtype!r} is not one of {', '.join(FLOAT_CODES)}; pick one of them")
    out_dir = check_output(out_dir, kind="dir", flag="--out", command="gguf-to-hf", inputs=(Path(gguf_path),),
                           owned=safetensors_metadata(OUTPUT_MARKER_KEY, OUTPUT_MARKER, SINGLE_NAME))
    gguf_file = GGUFFile.open(gguf_path)
    vocab = vocab_from_gguf(gguf_file)
    config = build_config(gguf_file, vocab, dtype)
    plans = plan_tensors(gguf_file, config)
    texts = {
        "config.json": config,
        "generation_config.json": build_generation_config(config),
    }
    tokenizer_texts = tokenizer_files(vocab, model_max_length=int(config["max_position_embeddings"]))
    with atomic_dir(out_dir) as tmp:
        for name, data in texts.items():
            (tmp / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for name, text in tokenizer_texts.items():
            (tmp / name).write_text(text, encoding="utf-8")
        by_name = {p.hf_name: p for p in plans}
        write_checkpoint(tmp, [OutputTensor(p.hf_name, p.shape, FLOAT_CODES[dtype]) for p in plans],
                         lambda t: _cast_bytes(hf_tensor(gguf_file, by_name[t.name]), dtype), progress=_progress(progress),
                         metadata={OUTPUT_MARKER_KEY: OUTPUT_MARKER})
    return out_dir

