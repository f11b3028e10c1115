"""``quantize_gptq``: branch specs + calibration text -> GPTQ branch directories (the CLI's library call)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from quantmill.calib_data.loaders import DEFAULT_TEXT_FIELD
from quantmill.outputs import check_output, remove_own_temporaries
from quantmill.quantize.gptq.branches import DEFAULT_DAMP_PERCENT, parse_branches
from quantmill.quantize.gptq.checkpoint import DEFAULT_MAX_SHARD_BYTES
from quantmill.quantize.gptq.engine import BranchResult, EngineOptions, check_input

if TYPE_CHECKING:
    from quantmill.calib_data.sampling import CalibrationSet


@dataclass(frozen=True)
class GptqRun:
    calibration: CalibrationSet
    branches: list[BranchResult]


BRANCH_MARKERS = ("quantize_config.json", "quantmill_gptq.json")  # a v1 / a compressed-tensors branch


def _is_branch(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and any((path / m).is_file() for m in BRANCH_MARKERS)


def _earlier_gptq_output(out_dir: Path) -> bool:
    """Every entry is an earlier branch (it holds quantize_config.json or quantmill_gptq.json) or a temporary of one."""
    return all(_is_branch(p)
               or (p.name.startswith(".") and p.name.endswith(".part")) for p in out_dir.iterdir())


def _check_out(model_dir: Path, calib: str, out_dir: Path, names: list[str]) -> None:
    """The output rule for --out and each branch directory; stale temporaries of these branches are removed."""
    inputs = [model_dir] + ([Path(calib)] if Path(calib).is_file() else [])
    out = check_output(out_dir, kind="dir", flag="--out", command="quantize gptq", inputs=inputs,
                       owned=_earlier_gptq_output)
    for name in names:
        check_output(out / name, kind="dir", flag="--out", command="quantize gptq", inputs=inputs,
                     owned=_is_branch)
        remove_own_temporaries(out / name)


def quantize_gptq(
    model_dir: Path,
    calib: str,
    out_dir: Path,
    branch_specs: Sequence[str],
    *,
    samples: int,
    seqlen: int,
    seed: int,
    damp_percent: float = DEFAULT_DAMP_PERCENT,
    true_sequential: bool = True,
    text_field: str = DEFAULT_TEXT_FIELD,
    device: str = "cpu",
    format: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
    checkpoint_dir: Path | None = None,
    max_memory: int | None = None,
) -> GptqRun:
    """Write one GPTQ branch per spec into ``out_dir/<branch name>`` (cheap checks first, then one pass)."""
    from quantmill.quantize.calibrate import prepare_calibration
    from quantmill.quantize.gptq.engine import quantize_branches
    from quantmill.quantize.resume import check_checkpoint_dir

    branches = parse_branches(list(branch_specs), damp_percent=damp_percent, true_sequential=true_sequential,
                              format=format)
    _check_out(Path(model_dir), calib, Path(out_dir), [b.name for b in branches])
    check_input(Path(model_dir))
    if checkpoint_dir is not None:
        check_checkpoint_dir(Path(checkpoint_dir))  # before calibration: nothing of the user's is ever removed
    calibration = prepare_calibration(Path(model_dir), calib, samples, seqlen, seed, text_field)
    options = EngineOptions(device=device, max_shard_bytes=max_shard_bytes, progress=progress, checkpoint_dir=checkpoint_dir,
                            max_memory=max_memory)
    return GptqRun(calibration, quantize_branches(Path(model_dir), calibration, branches, Path(out_dir), options))
