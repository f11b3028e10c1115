"""``calibrate``: calibration text -> seeded token sequences -> statistics pass -> imatrix file."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from quantmill.atomic import ensure_writable_dir
from quantmill.calib_data.generated import GENERATED_SPEC, generate_sequences
from quantmill.calib_data.loaders import DEFAULT_TEXT_FIELD, load_calibration_text
from quantmill.calib_data.sampling import CalibrationSet, check_sizes, load_tokenize, sample_sequences
from quantmill.errors import InputFileError, OutputError
from quantmill.outputs import check_output, gguf_signature
from quantmill.quantize.gguf.imatrix import Imatrix, imatrix_from_stats, write_imatrix
from quantmill.quantize.layerwise import arch_for, read_config


@dataclass(frozen=True)
class CalibrateResult:
    output: Path
    calibration: CalibrationSet
    imatrix: Imatrix


def prepare_calibration(
    model_dir: Path,
    calib: str,
    samples: int,
    seqlen: int,
    seed: int,
    text_field: str = DEFAULT_TEXT_FIELD,
    *,
    progress: bool = True,
) -> CalibrationSet:
    """Check the model, then load, tokenize and sample the calibration text (cheap checks first).

    ``calib`` is ``bundled``, a file, ``hub:OWNER/NAME[:SPLIT]``, or ``generated`` (the model
    samples its own sequences from seeded prompts; see ``calib_data/generated.py``).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputFileError(model_dir, "model directory not found", "pass a Hugging Face model directory")
    arch_for(model_dir, read_config(model_dir), capability=None)  # tokenizing only: the consuming stage checks its own
    check_sizes(samples, seqlen)
    tokenize = load_tokenize(model_dir)
    if calib == GENERATED_SPEC:
        return generate_sequences(model_dir, samples, seqlen, seed, progress=progress)
    return sample_sequences(load_calibration_text(calib, text_field), tokenize, samples, seqlen, seed)


def _input_files(model_dir: Path, calib: str) -> list[Path]:
    files = [model_dir, *(p for p in model_dir.iterdir() if p.is_file())] if model_dir.is_dir() else [model_dir]
    corpus = Path(calib)
    return files + ([corpus] if corpus.is_file() else [])


def calibrate_imatrix(
    model_dir: Path,
    calib: str,
    out: Path,
    *,
    samples: int,
    seqlen: int,
    seed: int,
    text_field: str = DEFAULT_TEXT_FIELD,
    device: str = "cpu",
    progress: bool = True,
    checkpoint_dir: Path | None = None,
    max_memory: int | None = None,
) -> CalibrateResult:
    """Write the importance matrix of ``model_dir`` on ``calib`` to ``out`` (GGUF imatrix, atomic)."""
    from quantmill.quantize.stats import collect_importance

    out = Path(out)
    if out.is_dir() and not out.is_symlink():
        raise OutputError(f"--out {out}: is a directory; pass a file name such as imatrix.gguf")
    check_output(out, kind="file", flag="--out", command="calibrate", inputs=_input_files(Path(model_dir), calib),
                 owned=gguf_signature)
    ensure_writable_dir(out.parent)
    if Path(model_dir).is_dir():
        arch_for(Path(model_dir), read_config(Path(model_dir)), "statistics")  # the family can run the pass, before any work
    if checkpoint_dir is not None:
        from quantmill.quantize.resume import check_checkpoint_dir

        check_checkpoint_dir(Path(checkpoint_dir))  # before calibration: nothing of the user's is ever removed
    calibration = prepare_calibration(model_dir, calib, samples, seqlen, seed, text_field, progress=progress)
    stats = collect_importance(Path(model_dir), calibration, device=device, progress=progress, checkpoint_dir=checkpoint_dir,
                               max_memory=max_memory)
    imatrix = imatrix_from_stats(stats, calibration)
    write_imatrix(imatrix, out)
    return CalibrateResult(out, calibration, imatrix)
