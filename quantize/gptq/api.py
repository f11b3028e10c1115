"""``quantize_gptq``: branch specs + calibration text -> GPTQ branch directories (the CLI's library call)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from quantmill.calib_data.loaders import DEFAULT_TEXT_FIELD
from quantmill.outputs import check_output, marker, remove_own_temporaries
from quantmill.quantize.gptq.branches import DEFAULT_DAMP_PERCENT, parse_branches
from quantmill.quantize.gptq.checkpoint import DEFAULT_MAX_SHARD_BYTES
from quantmill.quantize.gptq.engine import BranchResult, EngineOptions

if TYPE_CHECKING:
    from quantmill.calib_data.sampling import CalibrationSet


@dataclass(frozen=True)
class GptqRun:
    calibration: CalibrationSet
    branches: list[BranchResult]


BRANCH_MARKER = "quantize_config.json"


def _earlier_gptq_output(out_dir: Path) -> bool:
    """Every entry is an earlier branch (it holds quantize_config.json) or a temporary of one."""
    return all((p.is_dir() and not p.is_symlink() and (p / BRANCH_MARKER).is_file())
               or (p.name.startswith(".") and p.name.endswith(".part")) for p in out_dir.iterdir())


def _check_out(model_dir: Path, calib: str, out_dir: Path, names: list[str]) -> None:
    """The output rule for --out and each branch directory; stale temporaries of these branches are removed."""
    inputs = [model_dir] + ([Path(calib)] if Path(calib).is_file() else [])
    out = check_output(out_dir, kind="dir", flag="--out", command="quantize gptq", inputs=inputs,
                       owned=_earlier_gptq_output)
    for name in names:
        check_output(out / name, kind="dir", flag="--out", command="quantize gptq", inputs=inputs,
                     owned=marker(BRANCH_MARKER))
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
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> GptqRun:
    """Write one GPTQ branch per spec into ``out_dir/<branch name>`` (cheap checks first, then one pass)."""
    from quantmill.quantize.calibrate import prepare_calibration
    from quantmill.quantize.gptq.engine import quantize_branches

    branches = parse_branches(list(branch_specs), damp_percent=damp_percent, true_sequential=true_sequential)
    _check_out(Path(model_dir), calib, Path(out_dir), [b.name for b in branches])
    calibration = prepare_calibration(Path(model_dir), calib, samples, seqlen, seed, text_field)
    options = EngineOptions(device=device, max_shard_bytes=max_shard_bytes, progress=progress)
    return GptqRun(calibration, quantize_branches(Path(model_dir), calibration, branches, Path(out_dir), options))
