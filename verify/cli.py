"""``quantmill verify``: a thin click command over :mod:`quantmill.verify.evaluate`."""
from __future__ import annotations

from pathlib import Path

import click


@click.command("verify")
@click.argument("artifacts", nargs=-1, type=click.Path(path_type=Path))
@click.option("--reference", "reference_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="The fp16 reference checkpoint directory; its tokenizer.json tokenizes the text once for all.")
@click.option("--text", "text", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Evaluation text (UTF-8); it must tokenize to at least two chunks.")
@click.option("--n-ctx", type=int, default=512, show_default=True, help="Tokens per chunk; the second half of each is scored.")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write the figures as JSON, one record per artifact.")
@click.option("--threads", type=int, default=None, help="CPU threads [default: all this process may use].")
@click.option("--batch-chunks", type=int, default=None,
              help="Chunks evaluated per model call [default: 2048 // n-ctx, as llama-perplexity's batch of 2048].")
@click.option("--max-chunks", type=int, default=None, help="Evaluate only the first N chunks.")
def verify(
    artifacts: tuple[Path, ...],
    reference_dir: Path,
    text: Path,
    n_ctx: int,
    json_path: Path | None,
    threads: int | None,
    batch_chunks: int | None,
    max_chunks: int | None,
) -> None:
    """Measure the perplexity of ARTIFACTS (GGUF files, HF checkpoints) and of the reference, on the same tokens."""
    import sys

    from quantmill.errors import UserInputError
    from quantmill.verify.backends.base import BackendOptions
    from quantmill.verify.evaluate import verify_artifacts
    from quantmill.verify.report import markdown_table, write_json_report

    if batch_chunks is not None and batch_chunks < 1:
        raise UserInputError(f"--batch-chunks {batch_chunks}: must be at least 1")
    if threads is not None and threads < 1:
        raise UserInputError(f"--threads {threads}: must be at least 1")
    if json_path is not None:
        from quantmill.atomic import ensure_writable_dir

        ensure_writable_dir(json_path.resolve().parent)  # fail now, not after the evaluation
    options = BackendOptions(threads=threads, chunks_per_batch=batch_chunks)
    result = verify_artifacts(
        artifacts, reference_dir, text, n_ctx, options, max_chunks=max_chunks, progress=sys.stderr.isatty()
    )
    click.echo(markdown_table(result))
    if json_path is not None:
        write_json_report(result, json_path)
        click.echo(f"wrote {json_path}")
