"""The gguf-mix stage: per-tensor types chosen for a size budget (quantize/gguf/mix.py), written by libllama.

The costs come from the base GGUF and the importance matrix of the one calibration pass; with ``refine`` each
tensor's KLD gain is measured on the reference over the first ``REFINE_TOKENS`` (sequences, tokens) of the calibration set.
"""
from __future__ import annotations

from quantmill.card import GGUF_DIR
from quantmill.pipeline.context import Estimate, ModelSize, Output, StageContext, StageKind, StageParams
from quantmill.pipeline.stages.imatrix import IMATRIX_NAME
from quantmill.quantize.cost import mix_peak
from quantmill.quantize.gguf.sensitivity import DEFAULT_REFINE_TOKENS as REFINE_TOKENS

MIX_RECORD = "mix.json"


class GgufMixParams(StageParams):
    name: str
    target_bpw: float | None
    target_size: int | None
    refine: bool
    model: str  # the reference (for the gains)
    calibration: str
    base: str
    base_file: str
    imatrix: str
    file: str
    threads: int


def run(ctx: StageContext, params: GgufMixParams) -> None:
    import json

    from quantmill.atomic import write_text_atomic
    from quantmill.pipeline.stages.calibrate import load_calibration
    from quantmill.quantize.gguf.mix import MixTarget, choose_mix, write_mix

    target = MixTarget(size=params.target_size, bpw=params.target_bpw, name=params.name)
    samples, seqlen = REFINE_TOKENS
    ids = load_calibration(ctx.inputs[params.calibration]).token_ids[:samples, :seqlen] if params.refine else None
    plan = choose_mix(ctx.inputs[params.base] / params.base_file, ctx.inputs[params.imatrix] / IMATRIX_NAME, target,
                      threads=params.threads, refine_with=ctx.checkpoint(params.model) if params.refine else None,
                      token_ids=ids, output=ctx.out / params.file, progress=ctx.progress)
    write_mix(plan, ctx.out / params.file, threads=params.threads, progress=ctx.progress)
    write_text_atomic(ctx.out / MIX_RECORD, json.dumps(plan.record(), indent=2, sort_keys=True) + "\n")


def outputs(params: GgufMixParams) -> list[Output]:
    return [Output(params.file, f"{GGUF_DIR}/{params.file}", artifact=params.name),
            Output(MIX_RECORD, None, manifest=f"mixes/{params.name}")]


def estimate(size: ModelSize, params: GgufMixParams) -> Estimate:
    bpw = params.target_bpw if params.target_bpw is not None else 8.0 * (params.target_size or 0) / max(size.n_params, 1)
    tokens = REFINE_TOKENS[0] * REFINE_TOKENS[1] if params.refine else None
    # seconds per million parameters at 2 threads, measured on SmolLM2 (BENCHMARKS.md, a loaded machine): the errors
    # 0.4 (50 s), the gains 5.5 more (one model run per tensor; it grows faster than the model on larger ones)
    seconds = 0.4 + (5.5 if params.refine else 0.0)
    return Estimate.of(size, size.n_params * bpw / 8 * 1.05, seconds, lambda s: mix_peak(s.known_shape, tokens))


KIND = StageKind("gguf-mix", 1, GgufMixParams, run, estimate, outputs, needs=lambda p: ("gguf-quantize", *(("gguf-mix-gains",) if p.refine else ())))
