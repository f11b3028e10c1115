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

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from quantmill.errors import UserInputError

LOG = logging.getLogger("quantmill.statistics")

if TYPE_CHECKING:
    import torch

    from quantmill.calib_data.sampling import CalibrationSet
    from quantmill.convert.arch.base import Architecture
    from quantmill.quantize.layerwise import DecoderLayerStep, LayerwiseRunner, Observer
    from quantmill.quantize.resume import LayerCheckpoint


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


def collect_importance(model_dir: Path, calib: CalibrationSet, *, device: str = "cpu", progress: bool = True,
                       checkpoint_dir: Path | None = None, max_memory: int | None = None) -> ImportanceStats:
    """The importance matrix of every decoder linear, from one layer-by-layer pass.

    With ``checkpoint_dir``, the hidden states and the sums so far are checkpointed after every decoder
    layer (:mod:`quantmill.quantize.resume`); a pass killed mid-way resumes at its first unfinished layer.
    With ``max_memory`` (bytes) the activation stream is spilled to disk when it would not fit (in the
    checkpoint directory, else in the system's temporary directory); the result does not depend on it.
    """
    with ExitStack() as stack:
        return _collect_importance(stack, model_dir, calib, device, progress, checkpoint_dir, max_memory)


def _spill_dir(stack: ExitStack, runner: LayerwiseRunner, calib: CalibrationSet, checkpoint: LayerCheckpoint,
               max_memory: int | None) -> Path | None:
    import tempfile

    from quantmill.convert.safetensors_io import Checkpoint
    from quantmill.quantize.cost import PassShape, layer_params, needs_spill, statistics_peak
    from quantmill.quantize.resume import STREAMS_DIR

    if max_memory is None:
        return None
    with Checkpoint(runner.model_dir) as ckpt:
        params = layer_params(ckpt.entries, runner.decoder.layer_prefix.format(index=0))
    shape = PassShape.of(runner.config, params, calib.samples, calib.seqlen, runner.batch_size * calib.seqlen)
    if not needs_spill("statistics", statistics_peak(shape, False), statistics_peak(shape, True), max_memory, runner.model_dir):
        return None
    if checkpoint.enabled:
        directory = checkpoint.path(STREAMS_DIR)
        directory.mkdir(exist_ok=True)
        return directory
    return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="quantmill-spill-")))


def _collect_importance(stack: ExitStack, model_dir: Path, calib: CalibrationSet, device: str, progress: bool,
                        checkpoint_dir: Path | None, max_memory: int | None) -> ImportanceStats:
    from quantmill.progress import LayerProgress
    from quantmill.quantize.layerwise import LayerwiseRunner, arch_for, read_config
    from quantmill.quantize.resume import LayerCheckpoint, as_tensor
    from quantmill.quantize.spill import StreamFile

    config = read_config(model_dir)
    arch = arch_for(model_dir, config)
    checkpoint = LayerCheckpoint(checkpoint_dir, {"pass": "statistics", "kinds": ["sum_squares"], "config": config,
                                                  "calibration": calib.record()})
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    runner = LayerwiseRunner(model_dir, calib.token_ids, device=device, progress=False, desc="statistics")
    saved = checkpoint.load()
    runner.spill_dir = _spill_dir(stack, runner, calib, checkpoint, max_memory)
    stack.callback(runner.drop_streams)
    start, hidden = 0, None
    if saved is not None:
        start = saved.next_layer
        if runner.spill_dir is not None:
            hidden = runner.adopt_stream("hidden", StreamFile.copy_of(saved.files.pop("hidden"), runner.spill_dir / "hidden.npy"))
            saved.arrays.pop("hidden")
        else:
            hidden = as_tensor(saved.arrays.pop("hidden"))
        sums = {name.removeprefix("sum_squares/"): np.array(a) for name, a in saved.arrays.items()}
        counts = {name: int(n) for name, n in saved.state["counts"].items()}
        LOG.info("statistics: resumed at layer %d of %d from %s", start, runner.n_layers, checkpoint.directory)
    bar = LayerProgress("statistics", runner.n_layers, start, bars=progress)
    for step in runner.layers(start, hidden):
        collectors, observers = attach_collectors(step, ("sum_squares",))
        step.run(observers, update=True)
        for name, per_kind in collectors.items():
            collector = per_kind["sum_squares"]
            assert isinstance(collector, SumSquares)
            sums[name] = collector.values()
            counts[name] = collector.count
        if step.index + 1 < runner.n_layers:  # what the next layer needs; after the last one the caller writes the result
            stream = runner.stream_file(runner.hidden) or runner.hidden
            checkpoint.save(step.index + 1, {"hidden": stream, **{f"sum_squares/{n}": a for n, a in sums.items()}},
                            {"counts": counts})
        bar.advance(f"layer {step.index}")
    bar.close()
    checkpoint.clear()  # the pass is done
    return ImportanceStats(arch, runner.n_layers, dict(sorted(sums.items())), dict(sorted(counts.items())))
