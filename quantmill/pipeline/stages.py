"""What each stage kind does: one function per kind, registered by name, over the stage libraries.

A stage function gets a :class:`StageContext` (its node, an empty temporary output directory, the
finished directories of the stages it reads) and writes its files into ``ctx.out``; the runner
renames the directory into place when the function returns. Model-producing stages write the
checkpoint into ``ctx.out / <release name>`` so that converters name GGUF files after the model.
"""
from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from quantmill.errors import InputFileError
from quantmill.pipeline.context import StageContext, gguf_file_name
from quantmill.pipeline.plan import check_source_weights, model_files
from quantmill.pipeline.snapshots import adapter_dir, hub_snapshot
from quantmill.recipe import BundledSource, HubSource, LocalSource

LOG = logging.getLogger("quantmill.pipeline")
CALIBRATION_NAME = "calibration"
IMATRIX_NAME = "imatrix.gguf"


StageFunction = Callable[[StageContext], None]
STAGES: dict[str, StageFunction] = {}


def stage(kind: str) -> Callable[[StageFunction], StageFunction]:
    def register(function: StageFunction) -> StageFunction:
        STAGES[kind] = function
        return function

    return register


def _copy_model(src: Path, dst: Path, allow_pickle: bool = False) -> None:
    from quantmill.convert.pickle_weights import PICKLE_INDEX, convert_pickle_weights

    check_source_weights(src, allow_pickle)
    files = model_files(src)
    dst.mkdir(parents=True, exist_ok=True)
    if not any(f.suffix == ".safetensors" for f in files):  # allowed pickles: converted, never copied
        convert_pickle_weights(src, dst)
        files = [f for f in files if f.name != PICKLE_INDEX]
    for path in files:  # copied, not linked: a later edit of the source must not change a finished stage
        shutil.copyfile(path, dst / path.name)


def _hub_snapshot(source: HubSource) -> Path:
    return hub_snapshot(source.id, source.revision, source.allow_pickle)


@stage("source")
def run_source(ctx: StageContext) -> None:
    source = ctx.plan.recipe.recipe.source
    out = ctx.out / ctx.plan.release_name
    if isinstance(source, BundledSource):
        from quantmill.default_model import default_reference

        _copy_model(default_reference(), out)
    elif isinstance(source, LocalSource):
        _copy_model(ctx.plan.recipe.resolve(source.path), out, source.allow_pickle)
    else:
        _copy_model(_hub_snapshot(source), out, source.allow_pickle)


@stage("merge")
def run_merge(ctx: StageContext) -> None:
    from quantmill.convert.merge.merge import merge_adapters

    previous = ctx.inputs[ctx.node.deps[0]] / ctx.plan.release_name
    from quantmill.convert.merge.adapter import PickleAdapterError

    adapters = [(adapter_dir(ctx.plan.recipe, a), a.weight) for a in ctx.plan.recipe.recipe.adapters]
    try:
        merge_adapters(previous, adapters, ctx.out / ctx.plan.release_name, progress=ctx.progress)
    except PickleAdapterError as exc:  # `run` never loads pickles: there is no flag to allow one
        raise InputFileError(exc.path, "is a pickle, which can run code when loaded; a release never loads pickles",
                             "re-save the adapter with safe_serialization=True (adapter_model.safetensors), or merge it"
                             " yourself with `quantmill merge --allow-pickle` and use the result as the recipe's source") from exc


@stage("bake")
def run_bake(ctx: StageContext) -> None:
    from quantmill.convert.bake import bake_rope

    rope = ctx.plan.recipe.recipe.rope
    assert rope is not None
    previous = ctx.inputs[ctx.node.deps[0]] / ctx.plan.release_name
    bake_rope(previous, rope.method, rope.factor, ctx.out / ctx.plan.release_name, rope.original_context,
              params=rope.params or None)


@stage("calibrate")
def run_calibrate(ctx: StageContext) -> None:
    from quantmill.calib_data.sampling import save_calibration_set
    from quantmill.quantize.calibrate import prepare_calibration

    cal = ctx.plan.recipe.recipe.calibration
    corpus = ctx.plan.recipe.input_path(cal.corpus)
    calibration = prepare_calibration(ctx.model_dir, str(corpus) if corpus else cal.corpus, cal.samples, cal.seqlen,
                                      cal.seed, cal.text_field, progress=ctx.progress)
    save_calibration_set(calibration, ctx.out / CALIBRATION_NAME)


def load_calibration(directory: Path):
    from quantmill.calib_data.sampling import load_calibration_set

    return load_calibration_set(directory / CALIBRATION_NAME)


@stage("imatrix")
def run_imatrix(ctx: StageContext) -> None:
    from quantmill.quantize.gguf.imatrix import imatrix_from_stats, write_imatrix
    from quantmill.quantize.stats import collect_importance

    calibration = load_calibration(ctx.input_dir("calibrate"))
    stats = collect_importance(ctx.model_dir, calibration, progress=ctx.progress)
    write_imatrix(imatrix_from_stats(stats, calibration), ctx.out / IMATRIX_NAME)


@stage("gptq")
def run_gptq(ctx: StageContext) -> None:
    from quantmill.quantize.gptq.engine import EngineOptions, quantize_branches

    gptq = ctx.plan.recipe.recipe.gptq
    assert gptq is not None
    calibration = load_calibration(ctx.input_dir("calibrate"))
    specs = [b.spec() for b in gptq.branches]
    quantize_branches(ctx.model_dir, calibration, specs, ctx.out, EngineOptions(progress=ctx.progress))


@stage("gguf-base")
def run_gguf_base(ctx: StageContext) -> None:
    from quantmill.convert.hf_to_gguf import convert_hf_to_gguf

    outtype = ctx.node.params["outtype"]
    convert_hf_to_gguf(ctx.model_dir, outtype, outfile=ctx.out / gguf_file_name(ctx.plan, outtype.upper()),
                       vocab_pre=ctx.node.params["vocab_pre"], threads=ctx.threads, progress=ctx.progress)


@stage("gguf")
def run_gguf(ctx: StageContext) -> None:
    from quantmill.quantize.gguf.libllama import quantize_gguf

    base_node = ctx.plan.node("gguf-base")
    base = ctx.input_dir("gguf-base") / gguf_file_name(ctx.plan, base_node.params["outtype"].upper())
    imatrix = ctx.input_dir("imatrix") / IMATRIX_NAME if "imatrix" in ctx.inputs else None
    type_name = ctx.node.params["type"]
    quantize_gguf(base, type_name, ctx.out / gguf_file_name(ctx.plan, type_name), threads=ctx.threads,
                  imatrix=imatrix, progress=ctx.progress)


@stage("verify")
def run_verify(ctx: StageContext) -> None:
    from quantmill.pipeline.verify_stage import verify_release

    verify_release(ctx)


@stage("release")
def run_release(ctx: StageContext) -> None:
    from quantmill.pipeline.release import assemble_release

    assemble_release(ctx)
