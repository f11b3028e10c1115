"""``quantmill convert gguf-to-hf``: a thin click command over :mod:`quantmill.convert.gguf_to_hf`."""
from __future__ import annotations

from pathlib import Path

import click

DTYPE_CHOICES = ("float16", "bfloat16", "float32")  # keep in step with gguf_to_hf.DTYPES (checked by a test)


@click.command("gguf-to-hf")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Output directory for the Hugging Face checkpoint (an earlier gguf-to-hf output is replaced atomically).")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="float16", show_default=True,
              help="Data type of the dequantized weights.")
@click.option("--quiet", is_flag=True, default=False, help="No progress bar.")
def gguf_to_hf(model: Path, out_dir: Path, dtype: str, quiet: bool) -> None:
    """Dequantize the GGUF file MODEL into a Hugging Face checkpoint (safetensors, config, tokenizer)."""
    from quantmill.convert.gguf_to_hf import gguf_to_hf as convert

    out = convert(model, out_dir, dtype=dtype, progress=not quiet)
    click.echo(f"wrote {out}")
