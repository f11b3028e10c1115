"""The source stage: the base checkpoint (bundled, a local directory, a Hub snapshot) copied as safetensors."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

from quantmill.errors import InputFileError
from quantmill.pipeline.context import Estimate, ModelSize, StageContext, StageKind, StageParams
from quantmill.quantize.cost import copy_peak

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class SourceParams(StageParams):
    origin: Literal["bundled", "local", "hub"]  # the recipe's source kind
    name: str  # the release name: the checkpoint's directory name in every model stage
    files: dict[str, str] = {}  # file name -> sha256 (bundled GGUF, local checkpoint: ctx.paths["source"])
    id: str | None = None  # hub
    revision: str | None = None
    allow_pickle: bool = False
    dtype: str | None = None  # bundled: the reference's dtype and format
    format: int | None = None


def model_files(directory: Path) -> list[Path]:
    """The files of a checkpoint directory a release reads (safetensors only, no pickles, no dotfiles)."""
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")
                  and not p.name.endswith(PICKLE_SUFFIXES))


def check_source_weights(directory: Path, allow_pickle: bool) -> None:
    """A source must have safetensors weights, or pickles it is allowed to convert: refused before any work."""
    from quantmill.convert.pickle_weights import pickle_shards

    if any(p.suffix == ".safetensors" for p in model_files(directory)):
        return
    if pickle_shards(directory):
        if allow_pickle:
            return
        raise InputFileError(directory, "has only PyTorch pickle weights (pytorch_model*.bin), which can run code when "
                             "loaded", "set allow_pickle: true on the recipe's source to convert them to safetensors "
                             "(torch.load with weights_only=True), or use a safetensors revision")
    raise InputFileError(directory, "has no .safetensors weights", "pass a complete Hugging Face checkpoint directory")


def copy_model(src: Path, dst: Path, allow_pickle: bool = False) -> None:
    from quantmill.convert.pickle_weights import PICKLE_INDEX, convert_pickle_weights

    check_source_weights(src, allow_pickle)
    files = model_files(src)
    dst.mkdir(parents=True, exist_ok=True)
    if not any(f.suffix == ".safetensors" for f in files):  # allowed pickles: converted, never copied
        convert_pickle_weights(src, dst)
        files = [f for f in files if f.name != PICKLE_INDEX]
    for path in files:  # copied, not linked: a later edit of the source must not change a finished stage
        shutil.copyfile(path, dst / path.name)


def run(ctx: StageContext, params: SourceParams) -> None:
    if params.origin == "local":
        copy_model(ctx.paths["source"], ctx.model_out, params.allow_pickle)
    elif params.origin == "hub":
        from quantmill.pipeline.snapshots import hub_snapshot

        assert params.id is not None and params.revision is not None
        copy_model(hub_snapshot(params.id, params.revision, params.allow_pickle), ctx.model_out, params.allow_pickle)
    else:
        from quantmill.default_model import default_reference

        copy_model(default_reference(), ctx.model_out)


def estimate(size: ModelSize, params: SourceParams) -> Estimate:
    converts = params.origin != "local" or params.allow_pickle  # GGUF / pickles: tensors converted, else files linked
    return Estimate.of(size, size.source_bytes, 0.05, lambda s: copy_peak(s.known_shape, converts))


KIND = StageKind("source", 1, SourceParams, run, estimate)
