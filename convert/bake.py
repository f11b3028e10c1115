"""Bake a RoPE scaling method into a copy of a Hugging Face checkpoint.

The copy holds the same tensors byte for byte (safetensors files are hard-linked
where the file system allows, else copied) and a rewritten config.json; what was
baked is recorded under ``"rope"`` in ``quantmill_bake.json`` (kept and extended
if the source already has one). The output directory appears complete or not at all; it
replaces an earlier bake output, never an unrelated non-empty directory. Fields the bake
does not touch (an LCKV layout, LongLLaMA's memory fields ...) are copied unchanged. An old
RefinedWeb config (Falcon's custom-code era, e.g. Alfred-40B-1023) is first translated as data
into transformers' Falcon fields, so the baked checkpoint loads without remote code.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from quantmill.atomic import atomic_dir, refuse_unrelated_dir
from quantmill.convert.arch.falcon import REFINEDWEB_TYPES, refinedweb_to_falcon
from quantmill.convert.lckv.config import is_lckv, parse_lckv
from quantmill.convert.rope import RopeBake, RopeBase, bake_rope_config, get_rope_method, parse_rope_factor
from quantmill.errors import InputFileError, UnsupportedError, UserInputError
from quantmill.jsonio import read_json_object

BAKE_RECORD = "quantmill_bake.json"
CONFIG = "config.json"
DEFAULT_ROPE_THETA = 10000.0
UNSCALED_TYPES = (None, "default")
# Configs transformers cannot read, translated as data before baking (recorded): model_type -> translation
CONFIG_TRANSLATIONS: dict[str, Callable[[dict[str, Any], Path], dict[str, Any]]] = dict.fromkeys(REFINEDWEB_TYPES, refinedweb_to_falcon)


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, "fix or re-save the file",
                            missing_fix="pass a Hugging Face model directory (config.json and *.safetensors)")


def _positive_int(config: dict[str, Any], key: str, path: Path) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InputFileError(path, f"field {key!r} is {value!r}, expected a positive integer", "fix config.json")
    return value


def _current_rope(config: dict[str, Any]) -> dict[str, Any]:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return rope if isinstance(rope, dict) else {}


def rope_base_from_config(
    config: dict[str, Any], path: Path, factor: float, original_context: int | None
) -> RopeBase:
    """The checkpoint's unscaled RoPE; refuses a config that is already scaled."""
    rope = _current_rope(config)
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type not in UNSCALED_TYPES:
        raise UnsupportedError(
            f"{path}: RoPE is already scaled (rope_type {rope_type!r}); bake from the unscaled checkpoint"
        )
    theta = rope.get("rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 1:
        raise InputFileError(path, f"rope_theta is {theta!r}, expected a number above 1", "fix config.json")
    n_head = _positive_int(config, "num_attention_heads", path)
    head_dim = config.get("head_dim") or _positive_int(config, "hidden_size", path) // n_head
    rotary_dim = int(head_dim * float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))))
    if original_context is None:
        if "max_position_embeddings" not in config:
            raise InputFileError(path, "has no max_position_embeddings", "pass --original-context N (the context the model was trained on)")
        original_context = _positive_int(config, "max_position_embeddings", path)
    elif isinstance(original_context, bool) or not isinstance(original_context, int) or original_context <= 0:
        raise UserInputError(f"--original-context {original_context!r} must be a positive number of tokens")
    return RopeBase(float(theta), rotary_dim, factor, original_context)


def baked_config(config: dict[str, Any], bake: RopeBake) -> dict[str, Any]:
    """config.json with the RoPE fields replaced (a top-level original_max_position_embeddings is dropped:
    transformers would let it override the one in rope_parameters)."""
    out = {k: v for k, v in config.items() if k != "original_max_position_embeddings"}
    out.update(bake.config_updates())
    return out


def _copy_entry(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst)
    elif src.suffix == ".safetensors":
        try:
            os.link(src, dst)  # same bytes, no copy; every writer here replaces files by rename
        except OSError:
            shutil.copy2(src, dst)
    else:
        shutil.copy2(src, dst)


def _dump(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def bake_rope(
    model_dir: Path | str,
    method: str,
    factor: float | str,
    out_dir: Path | str,
    original_context: int | None = None,
    *,
    params: dict[str, float] | None = None,
) -> Path:
    """Copy the checkpoint in ``model_dir`` to ``out_dir`` with ``method`` RoPE scaling baked in."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    get_rope_method(method)  # unknown method: refuse before reading anything
    scale = parse_rope_factor(factor)
    if not model_dir.is_dir():
        raise InputFileError(model_dir, "no such model directory", "pass the directory that holds config.json and the safetensors files")
    src, dst = model_dir.resolve(), out_dir.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise UserInputError(f"--out {out_dir}: must not be the model directory, inside it or above it; choose another directory")
    refuse_unrelated_dir(out_dir, BAKE_RECORD, "bake", (model_dir,))
    config_path = model_dir / CONFIG
    config = _read_json(config_path)
    if is_lckv(config):
        parse_lckv(config, config_path)  # a broken LCKV layout is refused here, not carried on
    translated_from = config.get("model_type") if config.get("model_type") in CONFIG_TRANSLATIONS else None
    if translated_from is not None:
        config = CONFIG_TRANSLATIONS[translated_from](config, config_path)
    base = rope_base_from_config(config, config_path, scale, original_context)
    bake = bake_rope_config(method, base, params)
    record_path = model_dir / BAKE_RECORD
    record = _read_json(record_path) if record_path.exists() else {}
    if translated_from is not None:
        record["config_translated_from"] = translated_from
    record["rope"] = {
        "method": method,
        "factor": scale,
        "original_context": base.original_context,
        "new_context": bake.max_position_embeddings,
        "base_rope_theta": base.rope_theta,
        "rotary_dim": base.rotary_dim,
        "params": {k: v for k, v in bake.rope_parameters.items() if k in get_rope_method(method).defaults},
        "config": bake.config_updates(),
        "gguf_keys": bake.gguf_keys,
        "gguf_tensors": list(bake.gguf_tensors),
        "notes": list(bake.notes),
    }
    with atomic_dir(out_dir) as tmp:
        for entry in sorted(model_dir.iterdir()):
            if entry.name not in (CONFIG, BAKE_RECORD):
                _copy_entry(entry, tmp / entry.name)
        (tmp / CONFIG).write_text(_dump(baked_config(config, bake)), encoding="utf-8")
        (tmp / BAKE_RECORD).write_text(_dump(record), encoding="utf-8")
    return out_dir
