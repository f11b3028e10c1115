"""The statistics pass: per linear layer, statistics of its inputs over the calibration tokens.

Two accumulators, selectable by name (``COLLECTORS``):

* ``sum_squares``: Σx² per input column (float64 across batches) and the token count: the importance
  matrix that llama.cpp's K-quants and IQ types use.
* ``hessian``: XᵀX (in_features x in_features, float32) and the token count: what GPTQ
  needs (its H is 2·XᵀX / count). Its diagonal is Σx² again.

``iter_layer_stats`` runs ONE forward pass, one decoder layer at a time (see
``layerwise.py``), and yields each layer's collectors as soon as the layer is done, so a
caller can consume (GPTQ) or keep (imatrix) them. Calibration sequences have no padding:
every token counts.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from quantmill.errors import UserInputError

if TYPE_CHECKING:
    import torch

    from quantmill.calib_data.sampling import CalibrationSet
    from quantmill.convert.arch.base import Architecture
    from quantmill.quantize.layerwise import DecoderLayerStep, Observer


class InputCollector(Protocol):
    """Accumulates statistics of a linear's inputs, batch by batch."""

    count: int

    def add(self, x: torch.Tensor) -> None:
        """``x`` is (tokens, in_features)."""


@dataclass
class SumSquares:
    """Σx² per input column (float64) and the number of tokens seen."""

    sum_sq: torch.Tensor
    count: int = 0

    @classmethod
    def create(cls, in_features: int, device: torch.device) -> SumSquares:
        import torch

        return cls(torch.zeros(in_features, dtype=torch.float64, device=device))

    def add(self, x: torch.Tensor) -> None:
        # one batch is summed in float32 (7x faster than float64 on CPU), batches in float64
        xf = x.float()
        self.sum_sq += (xf * xf).sum(dim=0).to(self.sum_sq.dtype)
        self.count += int(x.shape[0])

    def values(self) -> np.ndarray:
        return self.sum_sq.cpu().numpy().copy()


@dataclass
class Hessian:
    """XᵀX (float32) over the inputs of one linear and the number of tokens seen."""

    xtx: torch.Tensor
    count: int = 0

    @classmethod
    def create(cls, in_features: int, device: torch.device) -> Hessian:
        import torch

        return cls(torch.zeros(in_features, in_features, dtype=torch.float32, device=device))

    def add(self, x: torch.Tensor) -> None:
        xf = x.float()
        self.xtx.addmm_(xf.t(), xf)
        self.count += int(x.shape[0])

    def diagonal(self) -> np.ndarray:
        """Σx² per column, as the importance matrix wants it."""
        return self.xtx.diagonal().double().cpu().numpy()


# name -> factory(in_features, device); the kinds a statistics pass can collect.
COLLECTORS: dict[str, Callable[[int, Any], InputCollector]] = {
    "sum_squares": SumSquares.create,
    "hessian": Hessian.create,
}


@dataclass
class LayerStats:
    """The collectors of one decoder layer: ``collectors[hf_linear_name][kind]``."""

    index: int
    collectors: dict[str, dict[str, InputCollector]] = field(default_factory=dict)


def attach_collectors(
    step: DecoderLayerStep, kinds: Sequence[str], linears: Sequence[str] | None = None
) -> tuple[dict[str, dict[str, InputCollector]], dict[str, Observer]]:
    """Fresh collectors for ``linears`` (default: all) of ``step``, and the observers feeding them.

    Linears of one input group (q/k/v, gate/up) read the same input, so they share one set
    of collector objects, fed once: ``collectors`` maps each HF linear name to its set.
    """
    unknown = sorted(set(kinds) - set(COLLECTORS))
    if unknown or not kinds:
        raise UserInputError(f"statistics kinds {unknown or list(kinds)} are not known; choose from {', '.join(sorted(COLLECTORS))}")
    modules = step.linears()
    selected = set(linears) if linears is not None else set(modules)
    strangers = sorted(selected - set(modules))
    if strangers:
        raise KeyError(f"layer {step.index} has no linear(s) {strangers}")
    collectors: dict[str, dict[str, InputCollector]] = {}
    observers: dict[str, Observer] = {}
    for group in step.decoder.linear_groups:
        members = [name for name in group if name in selected]
        if not members:
            continue
        in_features = modules[members[0]].in_features
        per_kind: dict[str, InputCollector] = {kind: COLLECTORS[kind](in_features, step.runner.device) for kind in sorted(set(kinds))}
        for name in members:
            collectors[step.hf_name(name)] = per_kind

        def observe(x: torch.Tensor, _cs: tuple[InputCollector, ...] = tuple(per_kind.values())) -> None:
            for collector in _cs:
                collector.add(x)

        observers[members[0]] = observe
    return collectors, observers


def iter_layer_stats(
    model_dir: Path,
    calib: CalibrationSet,
    kinds: Sequence[str] = ("sum_squares",),
    *,
    device: str = "cpu",
    progress: bool = True,
) -> Iterator[LayerStats]:
    """One forward pass, layer by layer; yields each layer's input statistics when it is done."""
    from quantmill.quantize.layerwise import LayerwiseRunner

    runner = LayerwiseRunner(model_dir, calib.token_ids, device=device, progress=progress, desc="statistics")
    for step in runner.layers():
        collectors, observers = attach_collectors(step, kinds)
        step.run(observers, update=True)
        yield LayerStats(step.index, collectors)


@dataclass(frozen=True)
class ImportanceStats:
    """Σx² and token counts per linear (HF names), ready for the imatrix file."""

    arch: Architecture
    n_layers: int
    sum_squares: dict[str, np.ndarray]
    counts: dict[str, int]


def collect_importance(model_dir: Path, calib: CalibrationSet, *, device: str = "cpu", progress: bool = True) -> ImportanceStats:
    """The importance matrix of every decoder linear, from one layer-by-layer pass."""
    from quantmill.quantize.layerwise import arch_for, read_config

    arch = arch_for(model_dir, read_config(model_dir))
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    n_layers = 0
    for layer in iter_layer_stats(model_dir, calib, ("sum_squares",), device=device, progress=progress):
        n_layers = layer.index + 1
        for name, per_kind in layer.collectors.items():
            collector = per_kind["sum_squares"]
            assert isinstance(collector, SumSquares)
            sums[name] = collector.values()
            counts[name] = collector.count
    return ImportanceStats(arch, n_layers, dict(sorted(sums.items())), dict(sorted(counts.items())))
