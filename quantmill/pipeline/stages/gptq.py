"""The gptq stage: one checkpoint per branch (bits, group, act-order, damp, format), in one streaming pass."""
from __future__ import annotations

from quantmill.card import GPTQ_DIR
from quantmill.pipeline.context import Estimate, ModelSize, OnDevice, Output, StageContext, StageKind
from quantmill.pipeline.stages.calibrate import load_calibration
from quantmill.quantize.gptq.branches import BranchSpec


class GptqParams(OnDevice):
    model: str
    calibration: str
    branches: tuple[BranchSpec, ...]
    threads: int


def run(ctx: StageContext, params: GptqParams) -> None:
    from quantmill.quantize.gptq.engine import EngineOptions, quantize_branches

    calibration = load_calibration(ctx.inputs[params.calibration])
    quantize_branches(ctx.checkpoint(params.model), calibration, list(params.branches), ctx.out,
                      EngineOptions(device=params.device, progress=ctx.progress, checkpoint_dir=ctx.checkpoints,
                                    max_memory=ctx.max_memory))


def outputs(params: GptqParams) -> list[Output]:
    return [Output(b.name, f"{GPTQ_DIR}/{b.name}", artifact=b.name) for b in params.branches]


def _peaks(size: ModelSize, branches: int) -> tuple[int, int]:
    from quantmill.quantize.cost import KEEP_BYTES, gptq_peak

    shape = size.pass_shape()
    return gptq_peak(shape, branches, False, KEEP_BYTES), gptq_peak(shape, branches, True, 0)


def estimate(size: ModelSize, params: GptqParams) -> Estimate:
    """Bytes: the branches, plus the layer checkpoints held while it runs; memory: the streams in memory, or spilled
    when resources.memory says they would not fit."""
    from quantmill.quantize.cost import checkpoint_disk, planned_peak

    n = len(params.branches)
    floats = size.n_params - size.n_embedding
    nbytes = sum(floats * (b.bits / 8 * 1.1) + size.n_embedding * 2 for b in params.branches)
    if size.shape is not None:
        in_memory, _ = _peaks(size, n)
        nbytes += checkpoint_disk(size.pass_shape(), n, size.max_memory is not None and in_memory > size.max_memory)
    return Estimate.of(size, nbytes, 1.6 * n, lambda s: planned_peak(*_peaks(s, n), s.max_memory))


KIND = StageKind("gptq", 1, GptqParams, run, estimate, outputs, needs=lambda p: ("gptq",), spills=True)
