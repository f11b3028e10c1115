"""The merge stage: LoRA adapters (PEFT format) merged into the checkpoint, in fp16."""
from __future__ import annotations

from quantmill.errors import InputFileError
from quantmill.pipeline.context import Estimate, StageContext, StageKind, StageParams
from quantmill.quantize.cost import streaming_peak


class AdapterParams(StageParams):
    files: dict[str, str]  # file name -> sha256: a Hub adapter is hashed like a local one, by its files
    weight: float


class MergeParams(StageParams):
    model: str  # the stage whose checkpoint the adapters are merged into
    adapters: tuple[AdapterParams, ...]  # adapter i is read from ctx.paths["adapter<i>"]


def run(ctx: StageContext, params: MergeParams) -> None:
    from quantmill.convert.merge.adapter import PickleAdapterError
    from quantmill.convert.merge.merge import merge_adapters

    adapters = [(ctx.paths[f"adapter{i}"], a.weight) for i, a in enumerate(params.adapters)]
    try:
        merge_adapters(ctx.checkpoint(params.model), adapters, ctx.model_out, progress=ctx.progress)
    except PickleAdapterError as exc:  # `run` never loads pickles: there is no flag to allow one
        raise InputFileError(exc.path, "is a pickle, which can run code when loaded; a release never loads pickles",
                             "re-save the adapter with safe_serialization=True (adapter_model.safetensors), or merge it"
                             " yourself with `quantmill merge --allow-pickle` and use the result as the recipe's source") from exc


KIND = StageKind("merge", 1, MergeParams, run, lambda size, p: Estimate.of(size, size.source_bytes, 0.1,
                                                                                   lambda s: streaming_peak(s.known_shape)),
                 needs=lambda p: ("merge",))
