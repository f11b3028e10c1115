"""``quantize_gptq``: branch specs + calibration text -> GPTQ branch directories (the CLI's library call)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from quantmill.calib_data.loaders import DEFAULT_TEXT_FIELD
from quantmill.quantize.gptq.branches import DEFAULT_DAMP_PERCENT, parse_branches
from quantmill.quantize.gptq.checkpoint import DEFAULT_MAX_SHARD_BYTES
from quantmill.quantize.gptq.engine import BranchResult, EngineOptions

if TYPE_CHECKING:
    from quantmill.calib_data.sampling import CalibrationSet


@dataclass(frozen=True)
class GptqRun:
    calibration: CalibrationSet
    branches: list[BranchResult]


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
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> GptqRun:
    """Write one GPTQ branch per spec into ``out_dir/<branch name>`` (cheap checks first, then one pass)."""
    from quantmill.quantize.calibrate import prepare_calibration
    from quantmill.quantize.gptq.engine import quantize_branches

    branches = parse_branches(list(branch_specs), damp_percent=damp_percent, true_sequential=true_sequential)
    calibration = prepare_calibration(Path(model_dir), calib, samples, seqlen, seed, text_field)
    options = EngineOptions(device=device, max_shard_bytes=max_shard_bytes, progress=progress)
    return GptqRun(calibration, quantize_branches(Path(model_dir), calibration, branches, Path(out_dir), options))
