"""The architecture registry: what :func:`register` fills (a name registered twice raises), and the
look-ups every stage uses (:func:`for_config`, :func:`for_gguf`) instead of a table of its own.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar

from quantmill.convert.arch.base import Architecture
from quantmill.errors import InputFileError, UnsupportedError

A = TypeVar("A", bound=type[Architecture])
_BY_ARCHITECTURE: dict[str, Architecture] = {}
_BY_MODEL_TYPE: dict[str, Architecture] = {}
_FAMILIES: dict[str, Architecture] = {}


def register(*hf_architectures: str, model_types: tuple[str, ...] = ()) -> Callable[[A], A]:
    """Class decorator: register one record under HF ``architectures`` names and ``model_type`` values."""

    def wrap(cls: A) -> A:
        if cls.name in _FAMILIES:
            raise ValueError(f"architecture family {cls.name!r} is registered twice ({cls.__name__})")
        for table, names, what in ((_BY_ARCHITECTURE, hf_architectures, "HF architecture"), (_BY_MODEL_TYPE, model_types, "model_type")):
            for name in names:
                if name in table:
                    raise ValueError(f"{what} {name!r} is registered twice ({table[name].name} and {cls.name})")
        cls.hf_architectures = tuple(hf_architectures)
        cls.model_types = tuple(model_types)
        instance = cls()
        _FAMILIES[cls.name] = instance
        for name in hf_architectures:
            _BY_ARCHITECTURE[name] = instance
        for name in model_types:
            _BY_MODEL_TYPE[name] = instance
        return cls

    return wrap


def families() -> list[Architecture]:
    """Every registered record, sorted by family name."""
    return [_FAMILIES[name] for name in sorted(_FAMILIES)]


def supported_architectures() -> list[str]:
    return sorted(_BY_ARCHITECTURE)


def resolve(config: Mapping[str, Any], config_path: Path) -> tuple[str, Architecture]:
    """The registered record for a config.json, by ``architectures`` then ``model_type``, with the name matched."""
    names = config.get("architectures")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise InputFileError(config_path, "field 'architectures' must be a list of strings", "fix config.json")
    for name in names or []:
        if name in _BY_ARCHITECTURE:
            return name, _BY_ARCHITECTURE[name]
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in _BY_MODEL_TYPE:
        return model_type, _BY_MODEL_TYPE[model_type]
    asked = ", ".join(names or []) or f"model_type {model_type!r}"
    raise UnsupportedError(
        f"{config_path}: architecture {asked} is not supported; supported: {', '.join(supported_architectures())}"
    )


def for_config(config: Mapping[str, Any], config_path: Path) -> Architecture:
    """The record for a config.json (see :func:`resolve`)."""
    return resolve(config, config_path)[1]


def for_gguf(gguf_arch: str, keys: Collection[str], path: Path | str) -> Architecture:
    """The record of a GGUF file: by ``general.architecture``, then by the family's own key prefix.

    Families that write their layout under their own prefix inside another family's GGUF
    architecture (LCKV's ``lckv.*`` keys in a ``llama`` file) are told apart by that prefix.
    """
    candidates = [a for a in families() if a.gguf_name == gguf_arch]
    marked = [a for a in candidates if a.gguf_key_prefix and any(k.startswith(a.gguf_key_prefix) for k in keys)]
    plain = [a for a in candidates if not a.gguf_key_prefix]
    found = marked or plain
    if not found:
        known = sorted({a.gguf_name for a in families()})
        raise UnsupportedError(f"{path}: GGUF architecture {gguf_arch!r} is not supported (supported: {', '.join(known)})")
    return found[0]
