"""Reading and validating PEFT LoRA adapter folders.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``
(pickle ``adapter_model.bin`` only when the caller allows it). Tensor names, after the
``base_model.model.`` prefix PEFT adds, say what each tensor is:

- ``M.lora_A.weight`` / ``M.lora_B.weight`` (+ ``M.lora_B.bias`` with ``lora_bias``):
  LoRA on a linear module ``M``;
- ``M.lora_embedding_A`` / ``M.lora_embedding_B``: LoRA on an embedding;
- ``M.lora_magnitude_vector``: the DoRA magnitude of ``M``;
- ``M.base_layer.weight|bias``: a saved copy of the base tensor under a LoRA module
  (PEFT saves the embeddings this way; a resized vocabulary shows up here);
- anything else (``lm_head.weight``, ``M.bias``): a full tensor saved because it was
  trained (``modules_to_save``, ``bias="all"``/``"lora_only"``) or resized. Full tensors
  replace the base tensor of the same name; they are never added.

The scale of module ``M`` is ``alpha/r`` (``alpha/sqrt(r)`` with ``use_rslora``) where
``r`` and ``alpha`` come from ``rank_pattern``/``alpha_pattern`` with PEFT's key
matching: the first pattern ``P`` (in file order) for which the regular expression
``(.*\\.)?(P)$`` matches the whole module name wins.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from quantmill.errors import InputFileError, UnsupportedError, UserInputError
from quantmill.jsonio import read_json_object

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."

# Suffix of an adapter tensor name -> its role in a LoRA module.
ROLE_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", "a"),
    (".lora_B.weight", "b"),
    (".lora_B.bias", "b_bias"),
    (".lora_embedding_A", "a_embedding"),
    (".lora_embedding_B", "b_embedding"),
    (".lora_magnitude_vector.weight", "magnitude"),
    (".lora_magnitude_vector", "magnitude"),
)
FROZEN_COPY_MARK = ".base_layer."

# Config fields that select a variant whose update is not W + s·B·A (or DoRA): field -> name.
UNSUPPORTED_FIELDS: dict[str, str] = {
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "velora_config": "VeLoRA",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "alora_invocation_tokens": "activated LoRA (applies only after its invocation tokens)",
    "use_qalora": "QA-LoRA",
    "target_parameters": "LoRA on nn.Parameter targets",
    "trainable_token_indices": "trainable token indices",
    "layer_replication": "layer replication",
    "megatron_config": "Megatron parallel layers",
}
# init_lora_weights values that leave the base weights untouched; the others (PiSSA, OLoRA,
# CorDA, LoftQ, LoRA-GA, ...) subtract the initial adapter from the base when training starts.
BASE_PRESERVING_INITS: tuple[object, ...] = (True, False, "gaussian", "eva", "orthogonal")

# Model types whose linear layers are GPT-2 style Conv1D (weight stored as in x out), and the
# module leaf names that are Conv1D there. PEFT picks fan_in_fan_out from the module type.
CONV1D_MODULES: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn", "c_proj", "c_fc", "q_attn"),
    "openai-gpt": ("c_attn", "c_proj", "c_fc"),
}


class TensorSource(Protocol):
    """Where an adapter's tensors come from: a safetensors memory map or a pickle's state dict."""

    names: list[str]

    def shape(self, name: str) -> tuple[int, ...]: ...

    def float32(self, name: str) -> Any: ...  # a torch.float32 tensor

    def close(self) -> None: ...


class SafetensorsSource:
    """Adapter tensors read from a memory-mapped safetensors file, one at a time."""

    def __init__(self, path: Path) -> None:
        from quantmill.convert.safetensors_io import SafetensorsFile

        self.path = path
        self._file = SafetensorsFile(path)
        self.names = list(self._file.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file.entries[name].shape

    def float32(self, name: str) -> Any:
        import torch

        from quantmill.convert.safetensors_io import to_float32

        entry = self._file.entries[name]
        return torch.from_numpy(to_float32(self._file.array(name), entry.dtype).copy())

    def close(self) -> None:
        self._file.close()


class StateDictSource:
    """Adapter tensors from a pickle ``adapter_model.bin`` (loaded with ``weights_only=True``)."""

    def __init__(self, path: Path) -> None:
        import torch

        self.path = path
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad pickle
            raise InputFileError(path, f"cannot load the pickle state dict ({type(exc).__name__})", "re-save the adapter as safetensors") from exc
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise InputFileError(path, "is not a state dict of tensors", "re-save the adapter as safetensors")
        self._state: dict[str, Any] = dict(sorted(state.items()))
        self.names = list(self._state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def float32(self, name: str) -> Any:
        import torch

        return self._state[name].to(torch.float32).clone()

    def close(self) -> None:
        self._state = {}


@dataclass
class LoraModule:
    """LoRA on one module ``key`` (e.g. ``model.layers.0.self_attn.q_proj``)."""

    key: str
    kind: str  # "linear" or "embedding"
    a: str  # adapter tensor names
    b: str
    rank: int
    alpha: float
    scaling: float
    fan_in_fan_out: bool = False
    b_bias: str | None = None
    magnitude: str | None = None

    @property
    def weight_name(self) -> str:
        return f"{self.key}.weight"

    @property
    def bias_name(self) -> str:
        return f"{self.key}.bias"


@dataclass
class Adapter:
    """One validated adapter folder and the weight it is applied with."""

    path: Path
    config: dict[str, Any]
    weight: float
    source: TensorSource
    weights_file: Path
    modules: dict[str, LoraModule] = field(default_factory=dict)
    # base tensor name -> adapter tensor name of a full tensor that replaces it
    replacements: dict[str, str] = field(default_factory=dict)
    # base tensor names whose replacement is a saved copy of the base (``base_layer``)
    frozen_copies: set[str] = field(default_factory=set)

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora"))

    @property
    def ensure_weight_tying(self) -> bool:
        return bool(self.config.get("ensure_weight_tying"))

    def describe(self) -> str:
        return str(self.weights_file)

    def close(self) -> None:
        self.source.close()


def pattern_key(patterns: Mapping[str, Any], module_key: str) -> str | None:
    """The first key of ``patterns`` that PEFT would match against ``module_key``, or None."""
    for pattern in patterns:
        try:
            if re.match(rf"(.*\.)?({pattern})$", module_key):
                return pattern
        except re.error as exc:
            raise UserInputError(
                f"pattern {pattern!r} in rank_pattern/alpha_pattern is not a valid regular expression ({exc}); fix adapter_config.json"
            ) from exc
    return None


def rank_and_alpha(config: Mapping[str, Any], module_key: str) -> tuple[int, float]:
    """``r`` and ``lora_alpha`` of one module, after ``rank_pattern`` and ``alpha_pattern``."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r_key = pattern_key(rank_pattern, module_key)
    a_key = pattern_key(alpha_pattern, module_key)
    rank = rank_pattern[r_key] if r_key is not None else config.get("r", 8)
    alpha = alpha_pattern[a_key] if a_key is not None else config.get("lora_alpha", 8)
    return int(rank), float(alpha)


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scale of B·A: alpha/r, or alpha/sqrt(r) for rank-stabilised LoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def parse_adapter_spec(spec: str) -> tuple[Path, float]:
    """``DIR`` or ``DIR:WEIGHT`` -> (directory, weight). A path that exists as written wins."""
    path = Path(spec)
    head, sep, tail = spec.rpartition(":")
    if sep and head and not path.exists():
        try:
            weight = float(tail)
        except ValueError:
            raise UserInputError(f"--adapter {spec!r}: {tail!r} is not a number; write DIR or DIR:WEIGHT") from None
        if not math.isfinite(weight):
            raise UserInputError(f"--adapter {spec!r}: the weight must be a finite number")
        return Path(head), weight
    return path, 1.0


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise InputFileError(directory, "adapter directory not found", "pass a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    return read_json_object(path, "re-save the adapter with save_pretrained()",
                            missing_fix="pass a PEFT adapter folder saved with save_pretrained()")


def validate_config(config: Mapping[str, Any], path: Path) -> None:
    """Refuse adapters whose update quantmill cannot merge exactly, naming the field."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise UnsupportedError(f"{path}: peft_type {peft_type!r} is not supported; quantmill merges LoRA and DoRA adapters")
    for name, what in UNSUPPORTED_FIELDS.items():
        value = config.get(name)
        if value not in (None, False, [], {}, ""):
            raise UnsupportedError(f"{path}: field {name!r} ({what}) is not supported by the merge; remove it or merge with PEFT")
    init = config.get("init_lora_weights", True)
    if init not in BASE_PRESERVING_INITS:
        raise UnsupportedError(
            f"{path}: init_lora_weights {init!r} changes the base weights when training starts; convert the adapter to plain LoRA"
            " with PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) and merge that"
        )
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InputFileError(path, f"field {key!r} is {value!r}, expected a number", "fix adapter_config.json")
    if config.get("r") is not None and config["r"] <= 0:
        raise InputFileError(path, f"field 'r' is {config['r']}, expected a positive integer", "fix adapter_config.json")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in patterns.values()):
            raise InputFileError(path, f"field {key!r} must map module patterns to numbers", "fix adapter_config.json")


class PickleAdapterError(InputFileError):
    """An adapter saved only as a pickle (adapter_model.bin), refused unless the caller allows pickles."""


def _open_weights(directory: Path, allow_pickle: bool) -> tuple[Path, TensorSource]:
    safetensors_path = directory / SAFETENSORS_NAME
    if safetensors_path.is_file():
        return safetensors_path, SafetensorsSource(safetensors_path)
    pickle_path = directory / PICKLE_NAME
    if pickle_path.is_file():
        if not allow_pickle:
            raise PickleAdapterError(
                pickle_path,
                "is a pickle, which can run code when loaded",
                "re-save the adapter with safe_serialization=True, or pass --allow-pickle if you trust its source",
            )
        return pickle_path, StateDictSource(pickle_path)
    raise InputFileError(directory, f"no {SAFETENSORS_NAME} found", "pass a PEFT adapter folder saved with save_pretrained()")


def _split_role(name: str) -> tuple[str, str] | None:
    for suffix, role in ROLE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], role
    return None


def fan_in_fan_out(config: Mapping[str, Any], base_model_type: str | None, module_key: str) -> bool:
    """Whether the base weight of ``module_key`` is stored (in, out), as PEFT decides it."""
    conv1d = CONV1D_MODULES.get(str(base_model_type))
    if conv1d is not None:
        return module_key.rsplit(".", 1)[-1] in conv1d
    return bool(config.get("fan_in_fan_out"))


def _build_module(
    key: str, parts: dict[str, str], adapter_file: Path, source: TensorSource, config: Mapping[str, Any], model_type: str | None
) -> LoraModule:
    embedding = "a_embedding" in parts or "b_embedding" in parts
    a_role, b_role = ("a_embedding", "b_embedding") if embedding else ("a", "b")
    for role in (a_role, b_role):
        if role not in parts:
            other = parts.get(b_role if role == a_role else a_role)
            raise InputFileError(adapter_file, f"tensor {other!r} has no matching {role.replace('_embedding', '')} factor", "re-save the adapter")
    a, b = parts[a_role], parts[b_role]
    a_shape, b_shape = source.shape(a), source.shape(b)
    if len(a_shape) != 2 or len(b_shape) != 2:
        raise UnsupportedError(f"{adapter_file}: tensor {a!r} has shape {list(a_shape)}; only linear and embedding LoRA (2-D factors) can be merged")
    rank = a_shape[0]
    if b_shape[1] != rank:
        raise InputFileError(adapter_file, f"tensors {a!r} {list(a_shape)} and {b!r} {list(b_shape)} disagree on the rank", "re-save the adapter")
    config_rank, alpha = rank_and_alpha(config, key)
    if config_rank != rank:
        raise InputFileError(
            adapter_file,
            f"tensor {a!r} has rank {rank} but adapter_config.json gives module {key!r} r={config_rank}",
            "fix r/rank_pattern in adapter_config.json",
        )
    module = LoraModule(
        key=key,
        kind="embedding" if embedding else "linear",
        a=a,
        b=b,
        rank=rank,
        alpha=alpha,
        scaling=lora_scaling(alpha, rank, bool(config.get("use_rslora"))),
        fan_in_fan_out=True if embedding else fan_in_fan_out(config, model_type, key),
        b_bias=parts.get("b_bias"),
        magnitude=parts.get("magnitude"),
    )
    if embedding and module.b_bias is not None:
        raise InputFileError(adapter_file, f"tensor {module.b_bias!r}: lora_bias is not defined for embeddings", "re-save the adapter")
    if bool(config.get("use_dora")) != (module.magnitude is not None):
        state = "has no" if config.get("use_dora") else "has a"
        raise InputFileError(
            adapter_file, f"module {key!r} {state} DoRA magnitude but use_dora is {bool(config.get('use_dora'))}",
            "fix use_dora in adapter_config.json"
        )
    return module


def load_adapter(directory: str | Path, weight: float = 1.0, *, allow_pickle: bool = False, base_model_type: str | None = None) -> Adapter:
    """Open and validate one adapter folder. The caller closes the returned adapter."""
    directory = Path(directory)
    config = _read_config(directory)
    validate_config(config, directory / CONFIG_NAME)
    weights_file, source = _open_weights(directory, allow_pickle)
    try:
        adapter = Adapter(path=directory, config=config, weight=weight, source=source, weights_file=weights_file)
        grouped: dict[str, dict[str, str]] = {}
        for name in sorted(source.names):
            local = name.removeprefix(KEY_PREFIX)
            split = _split_role(local)
            if split is not None:
                module_key, role = split
                grouped.setdefault(module_key, {})[role] = name
            elif FROZEN_COPY_MARK in local:
                target = local.replace(FROZEN_COPY_MARK, ".", 1)
                adapter.replacements[target] = name
                adapter.frozen_copies.add(target)
            elif ".lora_" in local or local.startswith("lora_"):
                raise UnsupportedError(f"{weights_file}: tensor {name!r} is not a LoRA tensor quantmill knows; only LoRA/DoRA adapters can be merged")
            else:
                adapter.replacements[local] = name
        for module_key, parts in sorted(grouped.items()):
            adapter.modules[module_key] = _build_module(module_key, parts, weights_file, source, config, base_model_type)
        if not adapter.modules and not adapter.replacements:
            raise InputFileError(weights_file, "holds no LoRA tensors", "pass the folder PEFT's save_pretrained() wrote")
    except BaseException:
        source.close()
        raise
    return adapter
