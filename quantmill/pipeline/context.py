"""The contract between the pipeline and its stages: what a stage kind is, what a stage is given.

A stage kind is ONE :class:`StageKind` record, one module each under ``quantmill/pipeline/stages/``.
A stage reads only its parameters (exactly what is hashed into its key) and its :class:`StageContext`
(paths, progress): where an input lives is not a parameter, its content hash is. This module imports
no other pipeline module.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer

from quantmill.device import without_default_device
from quantmill.quantize.cost import DEFAULT_BATCH_TOKENS, ModelShape, PassShape, Peak

STAGE_OVERHEAD_SECONDS = 1.0  # loading libraries and files, whatever the model's size


class StageParams(BaseModel):
    """A stage's parameters: validated, immutable, dumped as canonical JSON into its key."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class OnDevice(StageParams):
    """A torch stage's parameters, with where it runs (the recipe's ``resources.device``: cpu, cuda, cuda:N, auto).

    Hashed, as GPU float reductions may change the last bits; on the CPU the field is left out of the dump, so a CPU
    stage keeps the key it had before stages had devices."""

    device: str = "cpu"

    @model_serializer(mode="wrap")
    def _without_cpu(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return without_default_device(handler(self))


P = TypeVar("P", bound=StageParams)


@dataclass(frozen=True)
class Output:
    """``src`` (relative to a finished stage's directory) goes to ``dst`` in the release (None: not copied);
    ``artifact`` is the name verify measures it under; ``manifest`` the manifest key its JSON fills."""

    src: str
    dst: str | None
    artifact: str | None = None
    manifest: str | None = None


@dataclass(frozen=True)
class ModelSize:
    """What a stage's cost depends on: the model's size and shape, the calibration tokens, the memory budget."""

    n_params: int
    n_embedding: int  # parameters in the embedding and output matrices (kept in float by GPTQ)
    source_bytes: int
    shape: ModelShape | None = None  # None: not known (memory is then not predicted)
    samples: int = 0  # calibration sequences x tokens (the recipe's calibration section)
    seqlen: int = 0
    max_memory: int | None = None  # resources.memory

    @property
    def known_shape(self) -> ModelShape:
        assert self.shape is not None, "memory is predicted only where the shape is known"
        return self.shape

    def pass_shape(self) -> PassShape:
        return self.known_shape.pass_shape(self.samples, self.seqlen, DEFAULT_BATCH_TOKENS)


@dataclass(frozen=True)
class Estimate:
    bytes: int
    seconds: float
    memory: int | None = None  # predicted peak resident memory of the stage's process, bytes (None: not modelled)
    mapped: int = 0  # the part of ``memory`` that is memory-mapped files (page cache the kernel can reclaim)

    @property
    def required(self) -> int | None:
        """The memory that must be free for the stage: its peak without the reclaimable mapped files."""
        return None if self.memory is None else self.memory - self.mapped

    @classmethod
    def of(cls, size: ModelSize, nbytes: float, seconds_per_mparam: float,
           memory: Callable[[ModelSize], int | Peak] | None = None) -> Estimate:
        """``nbytes`` written; seconds from a throughput measured at 2 threads (BENCHMARKS.md); peak memory from
        the cost model (:mod:`quantmill.quantize.cost`) where the shape is known."""
        peak = None if memory is None or size.shape is None else memory(size)
        rss, mapped = (peak.rss, peak.mapped) if isinstance(peak, Peak) else (peak, 0)
        return cls(int(nbytes), STAGE_OVERHEAD_SECONDS + seconds_per_mparam * size.n_params / 1e6, rss, mapped)


@dataclass(frozen=True)
class StageContext:
    out: Path  # the empty temporary output directory
    inputs: dict[str, Path]  # dependency stage name -> its finished directory
    outputs: tuple[tuple[Path, Output], ...]  # the dependencies' outputs, each with its absolute path
    release_name: str  # checkpoints live in ``<stage dir>/<release name>``, GGUF files are named after it
    paths: dict[str, Path]  # the files it reads from outside the work directory, by role (hashed by content)
    progress: bool = False
    checkpoints: Path | None = None  # layer checkpoints of a layer-by-layer stage, kept across kills (None: none)
    max_memory: int | None = None  # resources.memory: the peak resident bytes a stage must stay under (never hashed)

    def checkpoint(self, stage: str) -> Path:
        """The checkpoint made by the model stage ``stage`` (source / merge / bake)."""
        return self.inputs[stage] / self.release_name

    @property
    def model_out(self) -> Path:
        return self.out / self.release_name


@dataclass(frozen=True)
class StageKind(Generic[P]):
    """One stage kind. Bump ``version`` when its output for the same parameters changes."""

    name: str
    version: int
    params: type[P]
    run: Callable[[StageContext, P], None]
    estimate: Callable[[ModelSize, P], Estimate]
    outputs: Callable[[P], list[Output]] = lambda params: []
    needs: Callable[[P], tuple[str, ...]] = lambda params: ()  # capabilities of the model's family it needs
    spills: bool = False  # fits under resources.memory by spilling its activation streams to disk


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the file system allows it (no extra disk), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def link_tree(src: Path, dst: Path) -> None:
    """``src`` (a file, or a directory's files without dotfiles) linked to ``dst``."""
    if src.is_file():
        link_or_copy(src, dst)
        return
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src)
        if not any(part.startswith(".") for part in rel.parts):
            link_or_copy(path, dst / rel)


def gguf_file_name(release_name: str, type_name: str) -> str:
    return f"{release_name}-{type_name}.gguf"
