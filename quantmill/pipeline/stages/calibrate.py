"""The calibrate stage: seeded token sequences from the calibration corpus, shared by imatrix and GPTQ."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from quantmill.pipeline.context import Estimate, Output, StageContext, StageKind, StageParams
from quantmill.quantize.cost import calibrate_peak

CALIBRATION_NAME = "calibration"


class CalibrateParams(StageParams):
    model: str
    corpus: str  # a file's name (read from ctx.paths["corpus"]), or bundled / generated / hub:...
    corpus_sha256: str
    samples: int
    seqlen: int
    seed: int
    text_field: str
    threads: int


def run(ctx: StageContext, params: CalibrateParams) -> None:
    from quantmill.calib_data.sampling import save_calibration_set
    from quantmill.quantize.calibrate import prepare_calibration

    corpus = str(ctx.paths.get("corpus", params.corpus))
    calibration = prepare_calibration(ctx.checkpoint(params.model), corpus, params.samples, params.seqlen,
                                      params.seed, params.text_field, progress=ctx.progress)
    save_calibration_set(calibration, ctx.out / CALIBRATION_NAME)


def load_calibration(directory: Path) -> Any:
    from quantmill.calib_data.sampling import load_calibration_set

    return load_calibration_set(directory / CALIBRATION_NAME)


KIND = StageKind("calibrate", 1, CalibrateParams, run,
                 lambda size, p: Estimate.of(size, p.samples * p.seqlen * 4 + 4096, 0.02, lambda s: calibrate_peak(s.known_shape, p.corpus)),
                 outputs=lambda p: [Output(f"{CALIBRATION_NAME}.json", None, manifest="calibration")])
