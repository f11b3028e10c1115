"""``quantmill quantize gptq``: GPTQ branches of a Hugging Face checkpoint, one directory per branch."""
from __future__ import annotations

from pathlib import Path

import click

from quantmill.calib_data.bundled import BUNDLED_SPEC

BRANCH_HELP = (
    "a branch to write, as BITSbit-GROUP[-actorder][-asym][-static] with GROUP 32g/64g/128g/none, "
    "e.g. 4bit-128g-actorder, 8bit-none-actorder, 3bit-64g; NAME=SPEC writes it to branch NAME (e.g. main=4bit-128g-actorder). "
    "Repeat for several branches; they share one streaming pass."
)


@click.command("gptq")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="directory that receives one sub-directory per branch (e.g. OUT/gptq-4bit-128g-actorder_True)")
@click.option("--branch", "branches", multiple=True, required=True, help=BRANCH_HELP)
@click.option("--calib", default=BUNDLED_SPEC, show_default=True,
              help="calibration text: 'bundled', a .txt/.jsonl/.parquet file, or hub:OWNER/NAME[:SPLIT] from the local HF cache")
@click.option("--text-field", default="text", show_default=True, help="field/column holding the text in .jsonl/.parquet")
@click.option("--calib-samples", type=int, default=32, show_default=True, help="number of calibration sequences")
@click.option("--calib-seqlen", type=int, default=512, show_default=True, help="tokens per calibration sequence")
@click.option("--seed", type=int, default=0, show_default=True, help="seed for choosing the sequences")
@click.option("--damp", type=float, default=0.01, show_default=True,
              help="damp_percent: fraction of the mean Hessian diagonal added to it (raised automatically when needed; recorded)")
@click.option("--no-true-sequential", is_flag=True,
              help="collect every linear's Hessian from the float layer instead of group by group")
@click.option("--max-shard-size", default="5GB", show_default=True, help="split the safetensors into files of at most this size")
@click.option("--format", "checkpoint_format", type=click.Choice(["gptq", "compressed-tensors"]), default="gptq",
              show_default=True,
              help="checkpoint layout of every branch that does not name one: gptq (AutoGPTQ/GPTQModel v1) or "
                   "compressed-tensors (llm-compressor's pack-quantized W4A16/W8A16, what vLLM reads); "
                   "a spec ending in -ct picks compressed-tensors for that branch")
@click.option("--device", default="cpu", show_default=True, help="torch device (cpu, cuda)")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
@click.option("--no-progress", is_flag=True, help="hide the progress bar")
def quantize_gptq(
    model_dir: Path, out_dir: Path, branches: tuple[str, ...], calib: str, text_field: str, calib_samples: int,
    calib_seqlen: int, seed: int, damp: float, no_true_sequential: bool, max_shard_size: str, checkpoint_format: str,
    device: str,
    threads: int | None, no_progress: bool,
) -> None:
    """Quantize MODEL_DIR with GPTQ into one checkpoint per --branch (v1 AutoGPTQ/GPTQModel or compressed-tensors)."""
    from quantmill.convert.merge.writer import parse_size
    from quantmill.errors import UserInputError
    from quantmill.quantize.gptq.api import quantize_gptq as run

    if threads is not None:
        if threads < 1:
            raise UserInputError(f"--threads {threads}: must be at least 1")
        import torch

        torch.set_num_threads(threads)
    result = run(
        model_dir, calib, out_dir, branches, samples=calib_samples, seqlen=calib_seqlen, seed=seed, damp_percent=damp,
        true_sequential=not no_true_sequential, text_field=text_field, device=device, format=checkpoint_format,
        max_shard_bytes=parse_size(max_shard_size), progress=not no_progress,
    )
    cal = result.calibration
    click.echo(f"calibration: {cal.samples} x {cal.seqlen} tokens from {cal.source} (seed {cal.seed}), sha256 {cal.sha256}")
    for branch in result.branches:
        notes = [f"{k}: {len(v)}" for k, v in branch.meta().items() if v]
        click.echo(f"wrote {branch.directory} ({', '.join(branch.files)})" + (f" [{'; '.join(notes)}]" if notes else ""))
