"""The gguf-base stage: HF checkpoint -> GGUF (f16 / bf16 / f32 / q8_0), the base of the K-quants."""
from __future__ import annotations

from quantmill.card import GGUF_DIR
from quantmill.pipeline.context import Estimate, Output, StageContext, StageKind, StageParams
from quantmill.quantize.cost import convert_peak

BYTES_PER_WEIGHT = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 1.07}


class GgufBaseParams(StageParams):
    model: str
    outtype: str
    vocab_pre: str | None
    file: str  # <release name>-<OUTTYPE>.gguf
    threads: int


def run(ctx: StageContext, params: GgufBaseParams) -> None:
    from quantmill.convert.hf_to_gguf import convert_hf_to_gguf

    convert_hf_to_gguf(ctx.checkpoint(params.model), params.outtype, outfile=ctx.out / params.file,
                       vocab_pre=params.vocab_pre, threads=params.threads, progress=ctx.progress)


def outputs(params: GgufBaseParams) -> list[Output]:
    return [Output(params.file, f"{GGUF_DIR}/{params.file}", artifact=params.outtype.upper())]


KIND = StageKind("gguf-base", 1, GgufBaseParams, run,
                 lambda size, p: Estimate.of(size, size.n_params * BYTES_PER_WEIGHT[p.outtype], 0.05,
                                             lambda s: convert_peak(s.known_shape)), outputs,
                 needs=lambda p: ("convert",))
