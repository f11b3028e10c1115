"""PyTorch pickle weights (``pytorch_model*.bin``) → safetensors, only where the recipe's source says ``allow_pickle``.

Many Hub checkpoints (Alfred-40B-1023, early Falcon and LLaMA fine-tunes) ship only pickles. They are
read with ``torch.load(weights_only=True)`` (tensors and plain containers only: no code object is
ever unpickled), memory-mapped, one shard at a time, and written as safetensors shards of the same
split with a ``model.safetensors.index.json``: every later stage reads safetensors only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quantmill.errors import InputFileError
from quantmill.jsonio import read_json_object

PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def pickle_shards(model_dir: Path) -> list[Path]:
    """The checkpoint's pickle shards, in their index's order (empty when it has none)."""
    index = model_dir / PICKLE_INDEX
    if index.is_file():
        weight_map = _read_index(index)
        names = sorted(set(weight_map.values()))
        for name in names:
            if Path(name).name != name or not (model_dir / name).is_file():
                raise InputFileError(index, f"names shard {name!r}, which is not a file of the model directory",
                                     "re-download the checkpoint")
        return [model_dir / name for name in names]
    single = model_dir / PICKLE_SINGLE
    return [single] if single.is_file() else []


def _read_index(path: Path) -> dict[str, str]:
    weight_map = read_json_object(path, "re-download the checkpoint").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputFileError(path, "has no weight_map of tensor -> shard names", "re-download the checkpoint")
    return weight_map


def _load_shard(path: Path) -> dict[str, Any]:
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise InputFileError(path, f"cannot be read as PyTorch weights with weights_only=True ({str(exc)[:160]})",
                             "use a safetensors revision of the model") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputFileError(path, "is not a state dict of tensors", "use a safetensors revision of the model")
    return state


def convert_pickle_weights(model_dir: Path, out_dir: Path) -> list[str]:
    """Write ``model_dir``'s pickle shards as safetensors shards into ``out_dir``; returns the file names written."""
    from safetensors.torch import save_file

    shards = pickle_shards(model_dir)
    if not shards:
        raise InputFileError(model_dir, "has neither safetensors nor pytorch_model*.bin weights", "pass a complete checkpoint")
    out_dir.mkdir(parents=True, exist_ok=True)
    names = ([f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
             if len(shards) > 1 else ["model.safetensors"])
    weight_map: dict[str, str] = {}
    total = 0
    for shard, name in zip(shards, names, strict=True):
        state = _load_shard(shard)
        # own, contiguous storage per tensor: safetensors refuses tensors that share memory (tied weights)
        tensors = {key: state[key].detach().contiguous().clone() for key in sorted(state)}
        del state
        save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        names.append(SAFETENSORS_INDEX)
    return names
