"""Every tensor's presence and shape against config.json, from the safetensors headers alone (no data read).

One check for every record, run by ``convert hf-to-gguf`` and ``quantize gptq`` before the first
byte is written: each checkpoint tensor is mapped to its GGUF kind (gguf-py's tensor map, as the
converter maps it) and its shape compared with what the config's sizes give; every decoder layer
up to ``num_hidden_layers`` must hold the linears (and pre-norm norms) of the record's decoder
spec, and the kinds layer 0 has; an empty tensor is refused. A mismatch is one
:class:`InputFileError` naming the tensor.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf

from quantmill.errors import InputFileError

if TYPE_CHECKING:
    from quantmill.convert.arch.base import Architecture
    from quantmill.convert.safetensors_io import TensorEntry

T = gguf.MODEL_TENSOR
FIX = "fix config.json or re-save the checkpoint"
FFN_KEYS = ("prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size", "n_inner", "hidden_dim",
            "ffn_hidden_size")
_BLOCK = re.compile(r"^blk\.(\d+)\.")


def _dims(arch: Architecture, hp: Mapping[str, Any]) -> dict[str, int | None]:
    hidden, n_head = int(hp["hidden_size"]), int(hp["num_attention_heads"])
    if arch.name == "falcon":
        from quantmill.convert.arch.falcon import kv_heads

        n_kv = kv_heads({"num_kv_heads": hp.get("num_kv_heads") or n_head, "multi_query": hp.get("multi_query", True),
                         "new_decoder_architecture": hp.get("new_decoder_architecture", False)})
    else:
        n_kv = int(hp.get("num_key_value_heads") or n_head)
    head_dim = int(hp.get("head_dim") or hidden // n_head)
    ff = next((hp[k] for k in FFN_KEYS if isinstance(hp.get(k), int)), None)
    if ff is None and arch.name == "falcon":
        ff = 4 * hidden
    return {"hidden": hidden, "q": n_head * head_dim, "kv": n_kv * head_dim, "head_dim": head_dim, "ff": ff,
            "qkv": (n_head + 2 * n_kv) * head_dim, "vocab": None}  # rows vs vocab_size: the converter's own check


# GGUF kind -> weight shape (rows first) in terms of _dims; a bias has the weight's row count.
_SHAPES: dict[T, tuple[str, ...]] = {
    T.TOKEN_EMBD: ("vocab", "hidden"), T.OUTPUT: ("vocab", "hidden"),
    T.OUTPUT_NORM: ("hidden",), T.ATTN_NORM: ("hidden",), T.ATTN_NORM_2: ("hidden",), T.FFN_NORM: ("hidden",),
    T.ATTN_Q: ("q", "hidden"), T.ATTN_K: ("kv", "hidden"), T.ATTN_V: ("kv", "hidden"), T.ATTN_OUT: ("hidden", "q"),
    T.ATTN_QKV: ("qkv", "hidden"), T.FFN_GATE: ("ff", "hidden"), T.FFN_UP: ("ff", "hidden"), T.FFN_DOWN: ("hidden", "ff"),
    T.ATTN_Q_NORM: ("head_dim",), T.ATTN_K_NORM: ("head_dim",),
}


def _expected(kind: T, is_bias: bool, dims: dict[str, int | None]) -> tuple[int | None, ...] | None:
    spec = _SHAPES.get(kind)
    if spec is None:
        return None
    shape = tuple(dims[d] for d in spec)
    return shape[:1] if is_bias else shape


def check_tensors(arch: Architecture, hp: Mapping[str, Any], entries: Mapping[str, TensorEntry], model_dir: Path,
                  config_path: Path | None = None) -> None:
    """Refuse a missing, empty or wrongly shaped tensor (named), before anything is written."""
    config_path = config_path or model_dir / "config.json"
    dims = _dims(arch, hp)
    n_layers = arch.block_count(dict(hp))
    name_map = arch.tensor_name_map(dict(hp))
    kinds_by_layer: dict[int, set[tuple[T, bool]]] = {}
    seen: set[T] = set()
    # LCKV layers that compute no KV have no k/v tensors (its own check_checkpoint checks which)
    per_layer_optional = {T.ATTN_K, T.ATTN_V} if "lckv" in hp else set()
    for name, entry in entries.items():
        if name.endswith(arch.skip_suffixes):
            continue
        if 0 in entry.shape:
            raise InputFileError(entry.file, f"tensor {name!r} is empty (shape {list(entry.shape)})", FIX)
        mapped = name_map.get_type_and_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            continue  # the converter refuses (or skips) unmapped names with its own message
        kind, gguf_name = mapped
        seen.add(kind)
        is_bias = name.endswith(".bias")
        if (block := _BLOCK.match(gguf_name)) is not None:
            kinds_by_layer.setdefault(int(block.group(1)), set()).add((kind, is_bias))
        want = _expected(kind, is_bias, dims)
        if want is None:
            continue
        got = tuple(entry.shape)
        if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want, strict=True)):
            shown = [w if w is not None else "?" for w in want]
            raise InputFileError(
                entry.file, f"tensor {name!r} has shape {list(got)} but {config_path.name} (hidden_size, heads, head_dim,"
                f" intermediate size) needs {shown}", FIX,
            )
    decoder = arch.decoder
    if decoder is not None:
        needed = list(decoder.linear_names)
        if decoder.pre_norm is not None:
            needed += [decoder.pre_norm.attn_norm, decoder.pre_norm.mlp_norm]
        for index in range(n_layers):
            for module in needed:
                name = f"{decoder.hf_linear_name(index, module)}.weight"
                if name not in entries:
                    raise InputFileError(
                        model_dir, f"has no tensor {name!r}, but num_hidden_layers is {n_layers}",
                        "check that every shard is present, or fix num_hidden_layers in config.json",
                    )
    first = kinds_by_layer.get(0, set())
    for index in range(1, n_layers):
        missing = sorted({kb for kb in first - kinds_by_layer.get(index, set()) if kb[0] not in per_layer_optional},
                         key=lambda kb: (kb[0].value, kb[1]))
        if missing:
            kind, is_bias = missing[0]
            gguf_name = f"blk.{index}.{gguf.TENSOR_NAMES[kind].split('.', 2)[-1]}.{'bias' if is_bias else 'weight'}"
            raise InputFileError(model_dir, f"layer {index} has no tensor for {gguf_name!r}, which layer 0 has",
                                 "check that every shard is present")
    for kind in (T.TOKEN_EMBD, T.OUTPUT_NORM):
        if kind not in seen:
            raise InputFileError(model_dir, f"has no tensor for {gguf.TENSOR_NAMES[kind] + '.weight'!r}",
                                 "check that every shard is present")
