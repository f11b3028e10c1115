"""The streaming GPTQ driver: one decoder layer in memory at a time, every branch side by side.

    results = quantize_branches(model_dir, calibration, [spec, ...], out_dir)

Per decoder layer the float weights are read once from the memory-mapped safetensors (the
layer-by-layer machinery of :mod:`quantmill.quantize.layerwise`); then, for each branch, the
layer's flow (:mod:`quantmill.quantize.gptq.flows`) walks its true-sequential groups (q/k/v,
then o, then gate/up, then down): XᵀX of a group's inputs is accumulated over the branch's
hidden states computed with the already-quantized earlier groups; linears that read the same
input share one Hessian and are quantized stacked, as one matrix; their weights are replaced
by the dequantized values; finally the quantized layer's outputs become the branch's inputs to
the next layer.

Each branch therefore keeps its own activation stream (samples × seqlen × hidden, float32): a
branch's quantized layers change what its later layers see, so branches cannot share
Hessians past the first group of the first layer. They share the calibration tokens, the
embedding and each layer's read from disk. Memory: one float layer (plus one working copy),
the branches' activation streams, and one group's Hessian at a time.

Every branch is written into a temporary directory next to its final one and renamed into
place only when all branches are complete: an error leaves no partial branch directory.
Calibration sequences carry no padding, so every token counts in the Hessians.
"""
from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from quantmill.atomic import atomic_dir, ensure_writable_dir
from quantmill.errors import UserInputError
from quantmill.quantize.gptq.algorithm import gptq_quantize
from quantmill.quantize.gptq.branches import BranchSpec
from quantmill.quantize.gptq.checkpoint import (
    DEFAULT_MAX_SHARD_BYTES,
    BranchWriter,
    quantization_config,
    write_configs,
    write_log,
)
from quantmill.quantize.gptq.flows import Flow, GenericFlow, PreNormFlow
from quantmill.quantize.gptq.packing import check_packable
from quantmill.quantize.layerwise import DEFAULT_BATCH_TOKENS, LayerwiseRunner, release_freed_memory

LOG = logging.getLogger("quantmill.gptq")

if TYPE_CHECKING:
    import torch
    from torch import nn

    from quantmill.calib_data.sampling import CalibrationSet
    from quantmill.convert.arch.base import DecoderSpec
    from quantmill.convert.safetensors_io import Checkpoint
    from quantmill.quantize.gptq.hessian import BlockedHessian as Hessian
    from quantmill.quantize.resume import LayerCheckpoint, SavedLayers
    from quantmill.quantize.spill import StreamFile


@dataclass(frozen=True)
class EngineOptions:
    device: str = "cpu"
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    progress: bool = True
    fast_flow: bool = True  # the pre-norm flow where the architecture has one (False: generic hooks)
    # glibc: serve every block >= 1 MiB by mmap (layerwise.bound_heap_growth). Measured here: no gain in
    # peak RSS for GPTQ (32 vs 8 random layers: 1.02x either way) but ~20% more time in page faults.
    bound_heap: bool = False
    # layer checkpoints (quantmill.quantize.resume): after each decoder layer, so a killed pass resumes at its layer
    checkpoint_dir: Path | None = None
    # peak resident memory the pass must stay under (bytes; None: no budget): above it the activation streams are
    # spilled to memory-mapped files (quantmill.quantize.spill); the output bytes do not depend on it
    max_memory: int | None = None


@dataclass(frozen=True)
class LinearRecord:
    """How one linear was quantized (what the branch's log and metadata report)."""

    name: str
    shape: tuple[int, int]
    tokens: int
    loss: float
    damp_percent: float | None
    hessian_dtype: str | None
    fallback: str | None

    def as_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "tokens": self.tokens, "loss": self.loss, "damp_percent": self.damp_percent,
                "hessian_dtype": self.hessian_dtype, "fallback": self.fallback}


@dataclass
class BranchResult:
    spec: BranchSpec
    directory: Path
    files: list[str] = field(default_factory=list)
    records: list[LinearRecord] = field(default_factory=list)

    def meta(self) -> dict[str, Any]:
        """Departures from the requested settings, for quantize_config.json's ``meta``."""
        damp = self.spec.damp_percent
        return {
            "damp_escalated": {r.name: r.damp_percent for r in self.records if r.damp_percent not in (None, damp)},
            "hessian_float64": sorted(r.name for r in self.records if r.hessian_dtype == "float64"),
            "fallback": {r.name: r.fallback for r in self.records if r.fallback},
        }


@dataclass
class _BranchRun:
    spec: BranchSpec
    hidden: torch.Tensor
    writer: BranchWriter
    result: BranchResult


def flow_for(decoder: DecoderSpec, fast: bool = True) -> Flow | Any:
    """The flow the architecture's decoder spec names (``fast`` False: the generic hooks, for tests)."""
    if decoder.flow == "lckv":
        from quantmill.quantize.gptq.lckv_flow import LckvFlow

        return LckvFlow(decoder.linear_groups)
    if decoder.flow == "pre-norm" and fast:
        assert decoder.pre_norm is not None
        return PreNormFlow(decoder.pre_norm)
    return GenericFlow(decoder.linear_groups)


def _quantize_stacked(layer: nn.Module, index: int, names: list[str], hessian: Hessian, run: _BranchRun, arch: DecoderSpec) -> None:
    import torch

    linears = [cast("nn.Linear", layer.get_submodule(name)) for name in names]
    weight = torch.cat([linear.weight.detach() for linear in linears])
    result = gptq_quantize(weight, hessian.matrix(), run.spec)
    if not bool(torch.isfinite(result.scales).all()):
        raise UserInputError(f"tensor {arch.hf_linear_name(index, names[0]) + '.weight'!r}: GPTQ scales are not finite"
                             " (NaN/Inf in the activations reaching this linear); check the checkpoint's weights for NaN/Inf")
    start = 0
    for name, linear in zip(names, linears, strict=True):
        part = result.rows(start, start + linear.out_features)
        start += linear.out_features
        with torch.no_grad():
            linear.weight.copy_(part.dequantized.to(linear.weight.dtype))
        full = arch.hf_linear_name(index, name)
        packed = run.spec.checkpoint_format.pack(part.codes.cpu().numpy(), part.scales.cpu().numpy(),
                                                 part.zeros.cpu().numpy(), part.g_idx.cpu().numpy(), run.spec)
        for tensor_name, array in packed.tensors(full).items():
            run.writer.add(tensor_name, array)
        run.writer.replaced.add(f"{full}.weight")
        run.result.records.append(LinearRecord(
            full, (linear.out_features, linear.in_features), hessian.count, part.loss,
            part.damp_percent, part.hessian_dtype, part.fallback,
        ))


def _quantize_layer(layer: nn.Module, index: int, run: _BranchRun, runner: LayerwiseRunner, flow: Flow) -> None:
    def quantize(group: Sequence[str], hessians: dict[str, Hessian]) -> None:
        for hessian in {id(h): h for h in hessians.values()}.values():  # each shared input once, in group order
            names = [name for name in group if hessians[name] is hessian]
            _quantize_stacked(layer, index, names, hessian, run, runner.decoder)

    flow.run(layer, run.hidden, runner, quantize, run.spec.true_sequential)


def check_model(ckpt: Checkpoint, runner: LayerwiseRunner) -> None:
    """Every linear to quantize exists and fits the v1 packing, before any work is done."""
    from quantmill.convert.arch.tensors import check_tensors
    from quantmill.errors import InputFileError

    check_tensors(runner.arch, runner.config.to_dict(), ckpt.entries, runner.model_dir)
    for index in range(runner.n_layers):
        for linear in runner.decoder.linear_names:
            name = f"{runner.decoder.hf_linear_name(index, linear)}.weight"
            if name not in ckpt:
                raise InputFileError(runner.model_dir, f"checkpoint has no tensor {name!r}", "pass a complete checkpoint")
            shape = ckpt.entries[name].shape
            check_packable(name, shape[1], shape[0])


def check_input(model_dir: Path) -> None:
    """The cheap checks of a GPTQ input (config fields, tensors against config.json), before calibration runs."""
    from quantmill.convert.arch.fields import check_fields
    from quantmill.convert.arch.tensors import check_tensors
    from quantmill.convert.safetensors_io import Checkpoint
    from quantmill.quantize.layerwise import arch_for, read_config

    model_dir = Path(model_dir)
    raw = read_config(model_dir)
    arch = arch_for(model_dir, raw, "gptq")
    check_fields(raw, model_dir / "config.json")
    assert arch.decoder is not None
    config_cls = arch.decoder.classes()[0]
    config = config_cls.from_dict(arch.transformers_config(raw, model_dir / "config.json"))
    with Checkpoint(model_dir) as ckpt:
        check_tensors(arch, config.to_dict(), ckpt.entries, model_dir)


def quantize_branches(
    model_dir: Path,
    calibration: CalibrationSet,
    branches: Sequence[BranchSpec],
    out_dir: Path,
    options: EngineOptions = EngineOptions(),
) -> list[BranchResult]:
    """Quantize ``model_dir`` into ``out_dir/<branch name>`` for every branch, in one streaming pass."""
    from quantmill.quantize.layerwise import bound_heap_growth

    if not branches:
        raise UserInputError("no GPTQ branch requested; add e.g. --branch 4bit-128g-actorder")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    runner = LayerwiseRunner(model_dir, calibration.token_ids, device=options.device, batch_tokens=options.batch_tokens,
                             progress=False, capability="gptq")
    if options.bound_heap:
        bound_heap_growth()
    results = [BranchResult(spec, out_dir / spec.name) for spec in branches]
    created = not out_dir.exists()
    try:
        done = _quantize_all(model_dir, calibration, out_dir, options, runner, results)
    except BaseException:
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # the directory this call created for the branches, left empty by the error
        raise
    if options.checkpoint_dir is not None:  # every branch is in place: the layer checkpoints are not needed again
        from quantmill.quantize.resume import remove_checkpoints

        remove_checkpoints(options.checkpoint_dir)
    return done


def _fingerprint(runner: LayerwiseRunner, calibration: CalibrationSet, results: list[BranchResult],
                 options: EngineOptions) -> dict[str, Any]:
    """What a layer checkpoint of this pass must have been made for."""
    from dataclasses import asdict

    return {"pass": "gptq", "config": runner.raw_config, "calibration": calibration.record(),
            "branches": [asdict(r.spec) for r in results], "fast_flow": options.fast_flow,
            "batch_tokens": options.batch_tokens}


def plan_memory(ckpt: Checkpoint, runner: LayerwiseRunner, calibration: CalibrationSet, branches: int,
                options: EngineOptions) -> bool:
    """Whether the activation streams must be spilled to fit ``options.max_memory``; refuses a budget nothing fits."""
    from quantmill.quantize.cost import KEEP_BYTES, PassShape, gptq_peak, layer_params, needs_spill

    params = layer_params(ckpt.entries, runner.decoder.layer_prefix.format(index=0))
    shape = PassShape.of(runner.config, params, calibration.samples, calibration.seqlen, options.batch_tokens)
    return needs_spill("gptq", gptq_peak(shape, branches, False, KEEP_BYTES), gptq_peak(shape, branches, True, 0),
                       options.max_memory, runner.model_dir)


def _branch_streams(runner: LayerwiseRunner, branches: int) -> list[torch.Tensor]:
    """One activation stream per branch from the embedded one (in memory: clones; spilled: file copies)."""
    from quantmill.quantize.spill import StreamFile

    if not runner.spilling:
        return [runner.hidden if i == branches - 1 else runner.hidden.clone() for i in range(branches)]
    assert runner.spill_dir is not None
    source = runner.streams.pop("hidden")
    streams = []
    for i in range(branches - 1):
        path = runner.spill_dir / f"hidden-{i}.npy"
        source.save_to(path)
        streams.append(runner.adopt_stream(f"hidden-{i}", StreamFile(path)))
    return [*streams, runner.adopt_stream(f"hidden-{branches - 1}", source)]


def _checkpoint(checkpoint: LayerCheckpoint, next_layer: int, runs: list[_BranchRun], flow: Any,
                runner: LayerwiseRunner) -> None:
    arrays: dict[str, torch.Tensor | StreamFile] = {}
    for i, run in enumerate(runs):
        arrays[f"{i}/hidden"] = runner.stream_file(run.hidden) or run.hidden
        arrays.update({f"{i}/flow/{name}": t for name, t in flow.state(run.hidden).items()})
    state = {"branches": [{"name": run.spec.name, "writer": run.writer.state(),
                           "records": [{"name": r.name, **r.as_json()} for r in run.result.records]} for run in runs]}
    checkpoint.save(next_layer, arrays, state)


def _restore(saved: SavedLayers, runs: list[_BranchRun], flow: Any, runner: LayerwiseRunner) -> None:
    from quantmill.quantize.resume import as_tensor
    from quantmill.quantize.spill import StreamFile

    for i, (run, branch) in enumerate(zip(runs, saved.state["branches"], strict=True)):
        run.result.records = [LinearRecord(r["name"], tuple(r["shape"]), r["tokens"], r["loss"], r["damp_percent"],
                                           r["hessian_dtype"], r["fallback"]) for r in branch["records"]]
        if runner.spill_dir is not None:
            copy = StreamFile.copy_of(saved.files[f"{i}/hidden"], runner.spill_dir / f"hidden-{i}.npy")
            run.hidden = runner.adopt_stream(f"hidden-{i}", copy)
        else:
            run.hidden = as_tensor(saved.arrays[f"{i}/hidden"])
        prefix = f"{i}/flow/"
        flow.restore(run.hidden, {k.removeprefix(prefix): as_tensor(a) for k, a in saved.arrays.items() if k.startswith(prefix)})


def _quantize_all(model_dir: Path, calibration: CalibrationSet, out_dir: Path, options: EngineOptions,
                  runner: LayerwiseRunner, results: list[BranchResult]) -> list[BranchResult]:
    import torch

    from quantmill.convert.safetensors_io import Checkpoint
    from quantmill.progress import LayerProgress
    from quantmill.quantize.resume import STREAMS_DIR, LayerCheckpoint

    checkpoint = LayerCheckpoint(options.checkpoint_dir, _fingerprint(runner, calibration, results, options))
    with ExitStack() as stack, torch.no_grad():
        ckpt = stack.enter_context(Checkpoint(model_dir))
        check_model(ckpt, runner)
        ensure_writable_dir(out_dir)
        saved = checkpoint.load()
        start = 0 if saved is None else saved.next_layer
        runs: list[_BranchRun] = []
        for i, result in enumerate(results):
            directory = stack.enter_context(atomic_dir(result.directory))
            spool = checkpoint.path(f"spool-{i}") if checkpoint.enabled else None
            writer = (BranchWriter(directory, result.spec, spool) if saved is None or spool is None else
                      BranchWriter.restore(directory, result.spec, spool, saved.state["branches"][i]["writer"]))
            runs.append(_BranchRun(result.spec, torch.empty(0), writer, result))
            stack.callback(writer.abort)
        flow = flow_for(runner.decoder, options.fast_flow)
        if plan_memory(ckpt, runner, calibration, len(runs), options):
            spill_dir = (checkpoint.path(STREAMS_DIR) if checkpoint.enabled else
                         Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".spill-", suffix=".part", dir=out_dir))))
            spill_dir.mkdir(exist_ok=True)
            runner.spill_dir, runner.keep_bytes = spill_dir, 0
            stack.callback(runner.drop_streams)
        if saved is None:
            runner._embed(ckpt)  # adapter: the runner's embedding step, one activation stream per branch
            for run, stream in zip(runs, _branch_streams(runner, len(runs)), strict=True):
                run.hidden = stream
        else:
            runner._rotary()
            _restore(saved, runs, flow, runner)
            LOG.info("gptq: resumed at layer %d of %d from %s", start, runner.n_layers, checkpoint.directory)
        runner.hidden = torch.empty(0)
        bar = LayerProgress(f"gptq ({len(runs)} branches)", runner.n_layers, start, bars=options.progress)
        for index in range(start, runner.n_layers):
            float_layer = runner._load_layer(ckpt, index)  # adapter: one layer from the memory map
            for i, run in enumerate(runs):
                layer = float_layer if i == len(runs) - 1 else copy.deepcopy(float_layer)
                _quantize_layer(layer, index, run, runner, flow)
                del layer
            del float_layer
            if index + 1 < runner.n_layers:
                _checkpoint(checkpoint, index + 1, runs, flow, runner)
            release_freed_memory()
            bar.advance(f"layer {index}")
        bar.close()
        for run in runs:
            run.hidden = torch.empty(0)
        runner.drop_streams()
        release_freed_memory()
        for run in runs:
            _finish_branch(run, ckpt, model_dir, runner, calibration, options)
    return results


def _finish_branch(run: _BranchRun, ckpt: Checkpoint, model_dir: Path, runner: LayerwiseRunner,
                   calibration: CalibrationSet, options: EngineOptions) -> None:
    directory = run.writer.directory
    run.result.files = run.writer.finish(ckpt, options.max_shard_bytes)
    meta = {"calibration": calibration.record(), **run.result.meta()}
    # the config stock loaders read (a RefinedWeb config becomes transformers' Falcon one, LongLLaMA plain llama)
    config = runner.arch.transformers_config(runner.raw_config, model_dir / "config.json")
    write_configs(directory, model_dir, config, quantization_config(run.spec, meta), run.spec, meta)
    write_log(directory, {r.name: r.as_json() for r in sorted(run.result.records, key=lambda r: r.name)})
