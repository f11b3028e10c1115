"""The imatrix stage: the importance matrix for GGUF K-quants, from one layer-by-layer pass over the calibration set."""
from __future__ import annotations

from quantmill.pipeline.context import Estimate, ModelSize, StageContext, StageKind, StageParams
from quantmill.pipeline.stages.calibrate import load_calibration

IMATRIX_NAME = "imatrix.gguf"


class ImatrixParams(StageParams):
    model: str
    calibration: str  # the calibrate stage
    threads: int


def run(ctx: StageContext, params: ImatrixParams) -> None:
    from quantmill.quantize.gguf.imatrix import imatrix_from_stats, write_imatrix
    from quantmill.quantize.stats import collect_importance

    calibration = load_calibration(ctx.inputs[params.calibration])
    stats = collect_importance(ctx.checkpoint(params.model), calibration, progress=ctx.progress,
                               checkpoint_dir=ctx.checkpoints, max_memory=ctx.max_memory)
    write_imatrix(imatrix_from_stats(stats, calibration), ctx.out / IMATRIX_NAME)


def memory(size: ModelSize) -> int:
    from quantmill.quantize.cost import planned_peak, statistics_peak

    shape = size.pass_shape()
    return planned_peak(statistics_peak(shape, False), statistics_peak(shape, True), size.max_memory)


KIND = StageKind("imatrix", 1, ImatrixParams, run,
                 lambda size, p: Estimate.of(size, size.n_params // 64 + 65536, 0.15, memory),
                 needs=lambda p: ("statistics",), spills=True)
