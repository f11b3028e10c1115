"""Architecture registry for HF → GGUF conversion.

Each model family is one module in this package that defines an ``Architecture``
subclass and registers it with ``@register(...)`` under its Hugging Face
``architectures`` names and ``model_type`` values. An architecture says which GGUF
architecture it becomes, how HF tensor names map to GGUF names, which per-tensor
transforms apply (as row permutations, so tensors can be streamed in row chunks),
which tensors it generates (such as ``rope_freqs``), which hyper-parameter keys it
writes, which tokenizer kinds it accepts and which vocabulary adjustments it needs.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import gguf
import numpy as np

from quantmill.errors import InputFileError, UnsupportedError

HParams = dict[str, Any]
# (hparams, tensor shape) -> row order: output row i is input row perm[i].
RowTransform = Callable[[HParams, tuple[int, ...]], np.ndarray]

# Modules that register architectures; imported on first lookup.
ARCH_MODULES: tuple[str, ...] = ("quantmill.convert.arch.llama", "quantmill.convert.arch.falcon", "quantmill.convert.arch.lckv")


class Architecture:
    """Describes how one model family converts. Subclasses set the class attributes."""

    gguf_arch: ClassVar[gguf.MODEL_ARCH]
    # Per GGUF tensor kind, a row permutation applied before writing.
    row_transforms: ClassVar[Mapping[gguf.MODEL_TENSOR, RowTransform]] = {}
    # Tokenizer kinds this family ships with (see quantmill.convert.vocab.VOCAB_KINDS).
    vocab_kinds: ClassVar[tuple[str, ...]] = ("sentencepiece", "bpe")
    # HF tensors that carry no weights llama.cpp needs.
    skip_suffixes: ClassVar[tuple[str, ...]] = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")

    @property
    def gguf_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def read_hparams(self, config: dict[str, Any], config_path: Path) -> HParams:
        """Validate config.json and fill the defaults transformers would apply."""
        raise NotImplementedError

    def block_count(self, hparams: HParams) -> int:
        return int(hparams["num_hidden_layers"])

    def check_checkpoint(self, hparams: HParams, tensor_names: set[str], model_dir: Path) -> None:
        """Refuse a checkpoint whose tensors contradict its config (before anything is written)."""

    def tensor_name_map(self, hparams: HParams) -> gguf.TensorNameMap:
        return gguf.get_tensor_name_map(self.gguf_arch, self.block_count(hparams))

    def extra_tensors(self, hparams: HParams) -> list[tuple[gguf.MODEL_TENSOR, np.ndarray]]:
        """Tensors generated from the config (written before the checkpoint's own)."""
        return []

    def write_hparams(self, writer: gguf.GGUFWriter, hparams: HParams, file_type: gguf.LlamaFileType) -> None:
        raise NotImplementedError

    def adjust_vocab_keys(self, writer: gguf.GGUFWriter, hparams: HParams) -> None:
        """Architecture-specific tokenizer keys written after the vocabulary."""


A = TypeVar("A", bound=type[Architecture])
_BY_ARCHITECTURE: dict[str, Architecture] = {}
_BY_MODEL_TYPE: dict[str, Architecture] = {}


def register(*hf_architectures: str, model_types: tuple[str, ...] = ()) -> Callable[[A], A]:
    """Class decorator: register one instance under HF ``architectures`` names and ``model_type`` values."""

    def wrap(cls: A) -> A:
        instance = cls()
        for name in hf_architectures:
            _BY_ARCHITECTURE[name] = instance
        for name in model_types:
            _BY_MODEL_TYPE[name] = instance
        return cls

    return wrap


def _load_all() -> None:
    for module in ARCH_MODULES:
        importlib.import_module(module)


def supported_architectures() -> list[str]:
    _load_all()
    return sorted(_BY_ARCHITECTURE)


def resolve(config: dict[str, Any], config_path: Path) -> tuple[str, Architecture]:
    """The registered architecture for a config.json, by ``architectures`` then ``model_type``."""
    _load_all()
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
