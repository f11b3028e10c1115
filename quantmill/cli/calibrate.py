"""``quantmill calibrate``: write an importance matrix (llama.cpp GGUF imatrix format)."""
from __future__ import annotations

from pathlib import Path

import click

from quantmill.calib_data.bundled import BUNDLED_SPEC
from quantmill.cli.options import checkpoint_dir_option, device_option, max_memory_option


@click.command("calibrate")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--calib", default=BUNDLED_SPEC, show_default=True,
              help="calibration text: 'bundled', a .txt/.jsonl/.parquet file, hub:OWNER/NAME[:SPLIT] from the local HF cache,"
                   " or 'generated' (the model samples its own text from seeded prompts; loads the whole model)")
@click.option("--text-field", default="text", show_default=True, help="field/column holding the text in .jsonl/.parquet")
@click.option("--calib-samples", type=int, default=32, show_default=True, help="number of sequences")
@click.option("--calib-seqlen", type=int, default=512, show_default=True, help="tokens per sequence")
@click.option("--seed", type=int, default=0, show_default=True, help="seed for choosing the sequences")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="imatrix file to write (e.g. imatrix.gguf)")
@device_option
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
@checkpoint_dir_option
@max_memory_option
@click.option("--no-progress", is_flag=True, help="hide the per-layer progress bar")
def calibrate(
    model_dir: Path, calib: str, text_field: str, calib_samples: int, calib_seqlen: int, seed: int,
    out: Path, device: str, threads: int | None, checkpoint_dir: Path | None, max_memory: int | None,
    no_progress: bool,
) -> None:
    """Run the calibration text through MODEL_DIR layer by layer and write its importance matrix."""
    from quantmill.device import resolve_device
    from quantmill.quantize.calibrate import calibrate_imatrix

    device = resolve_device(device)  # refused before the calibration set is drawn
    if threads:
        import torch

        torch.set_num_threads(threads)
    result = calibrate_imatrix(
        model_dir, calib, out, samples=calib_samples, seqlen=calib_seqlen, seed=seed,
        text_field=text_field, device=device, progress=not no_progress, checkpoint_dir=checkpoint_dir,
        max_memory=max_memory,
    )
    cal = result.calibration
    click.echo(f"wrote {result.output}: {len(result.imatrix.entries)} tensors, "
               f"{cal.samples} x {cal.seqlen} tokens from {cal.source} (seed {cal.seed})")
    click.echo(f"calibration token sha256: {cal.sha256}")
