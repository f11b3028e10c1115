"""Backends that turn an artifact into log-probabilities, registered by artifact format.

A format is detected from the path alone (cheap checks: no model is loaded); llama.cpp and torch
are imported only when an artifact is opened. Adding a backend is one row in :data:`BACKENDS`
plus its module.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from quantmill.errors import InputFileError
from quantmill.verify.backends.base import BackendOptions, LogProbBackend
from quantmill.verify.backends.gguf_llamacpp import LlamaCppBackend
from quantmill.verify.backends.gptq_torch import GptqTorchBackend, is_gptq_checkpoint
from quantmill.verify.backends.hf_torch import TorchBackend
from quantmill.verify.backends.lckv_torch import LckvTorchBackend, is_lckv_checkpoint


def _is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as fh:
        return fh.read(4) == b"GGUF"


def _is_hf_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


@dataclass(frozen=True)
class BackendSpec:
    """A registered backend: its format name, how to recognise an artifact, the class that runs it."""

    format: str
    detect: Callable[[Path], bool]
    factory: Callable[[Path, BackendOptions], LogProbBackend]
    description: str

    def open(self, path: Path, options: BackendOptions) -> LogProbBackend:
        return self.factory(path, options)


# Detection order matters: the first spec whose ``detect`` accepts a path wins.
BACKENDS: tuple[BackendSpec, ...] = (
    BackendSpec("gguf", _is_gguf, LlamaCppBackend, "GGUF file, run by libllama through llama-cpp-python"),
    BackendSpec("lckv", is_lckv_checkpoint, LckvTorchBackend,
                "LCKV checkpoint directory (float or GPTQ), run by quantmill's own reference forward"),
    BackendSpec("gptq", is_gptq_checkpoint, GptqTorchBackend, "GPTQ v1 checkpoint directory, dequantized to fp32 for transformers"),
    BackendSpec("hf", _is_hf_checkpoint, TorchBackend, "Hugging Face checkpoint directory (safetensors), run by transformers in fp32"),
)


def detect_format(path: str | Path) -> str:
    """The format name of the artifact at ``path``, or InputFileError."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(path, "no such file or directory", "give a .gguf file or a checkpoint directory")
    for spec in BACKENDS:
        if spec.detect(path):
            return spec.format
    kinds = "; ".join(f"{spec.format}: {spec.description}" for spec in BACKENDS)
    raise InputFileError(path, "not an artifact quantmill can evaluate", f"give one of: {kinds}")


def backend_spec(fmt: str) -> BackendSpec:
    for spec in BACKENDS:
        if spec.format == fmt:
            return spec
    raise InputFileError(fmt, "unknown artifact format", f"use one of {', '.join(s.format for s in BACKENDS)}")


def open_backend(path: str | Path, options: BackendOptions, fmt: str | None = None) -> LogProbBackend:
    """Load the artifact at ``path`` with the backend of its (detected) format."""
    path = Path(path)
    return backend_spec(fmt or detect_format(path)).open(path, options)
