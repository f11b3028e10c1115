"""The gguf stage: one K-quant (or legacy type) of the base GGUF through libllama, with the imatrix when asked."""
from __future__ import annotations

from quantmill.card import GGUF_DIR
from quantmill.pipeline.context import Estimate, ModelSize, Output, StageContext, StageKind, StageParams
from quantmill.pipeline.stages.imatrix import IMATRIX_NAME
from quantmill.quantize.cost import libllama_quantize_peak


class GgufParams(StageParams):
    type: str
    base: str  # the gguf-base stage and its file
    base_file: str
    imatrix: str | None  # the imatrix stage, if any
    file: str
    threads: int


def run(ctx: StageContext, params: GgufParams) -> None:
    from quantmill.quantize.gguf.libllama import quantize_gguf

    imatrix = ctx.inputs[params.imatrix] / IMATRIX_NAME if params.imatrix else None
    quantize_gguf(ctx.inputs[params.base] / params.base_file, params.type, ctx.out / params.file, threads=params.threads,
                  imatrix=imatrix, progress=ctx.progress)


def outputs(params: GgufParams) -> list[Output]:
    return [Output(params.file, f"{GGUF_DIR}/{params.file}", artifact=params.type)]


def estimate(size: ModelSize, params: GgufParams) -> Estimate:
    from quantmill.quantize.gguf.types import lookup_file_type

    return Estimate.of(size, size.n_params * lookup_file_type(params.type).nominal_bpw / 8 * 1.15, 0.1,
                       lambda s: libllama_quantize_peak(s.known_shape))


KIND = StageKind("gguf", 1, GgufParams, run, estimate, outputs, needs=lambda p: ("gguf-quantize",))
