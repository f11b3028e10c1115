"""The imatrix stage: the importance matrix for GGUF K-quants, from one layer-by-layer pass over the calibration set."""
from __future__ import annotations

from quantmill.pipeline.context import Estimate, ModelSize, OnDevice, StageContext, StageKind
from quantmill.pipeline.stages.calibrate import load_calibration

IMATRIX_NAME = "imatrix.gguf"


class ImatrixParams(OnDevice):
    model: str
    calibration: str  # the calibrate stage
    threads: int


def run(ctx: StageContext, params: ImatrixParams) -> None:
    from quantmill.quantize.gguf.imatrix import imatrix_from_stats, write_imatrix
    from quantmill.quantize.stats import collect_importance

    calibration = load_calibration(ctx.inputs[params.calibration])
    stats = collect_importance(ctx.checkpoint(params.model), calibration, device=params.device, progress=ctx.progress,
                               checkpoint_dir=ctx.checkpoints, max_memory=ctx.max_memory)
    write_imatrix(imatrix_from_stats(stats, calibration), ctx.out / IMATRIX_NAME)


def estimate(size: ModelSize, params: ImatrixParams) -> Estimate:
    """Bytes: the imatrix, plus the layer checkpoints held while it runs; memory: the stream in memory, or spilled."""
    from quantmill.quantize.cost import checkpoint_disk, planned_peak, statistics_peak

    nbytes = size.n_params // 64 + 65536
    if size.shape is None:
        return Estimate.of(size, nbytes, 0.15)
    shape = size.pass_shape()
    in_memory, spilled = statistics_peak(shape, False), statistics_peak(shape, True)
    nbytes += checkpoint_disk(shape, 1, size.max_memory is not None and in_memory > size.max_memory)
    return Estimate.of(size, nbytes, 0.15, lambda s: planned_peak(in_memory, spilled, s.max_memory))


KIND = StageKind("imatrix", 1, ImatrixParams, run, estimate, needs=lambda p: ("statistics",), spills=True)
