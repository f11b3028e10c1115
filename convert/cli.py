"""``quantmill convert hf-to-gguf``: a thin click command over ``convert_hf_to_gguf``."""
from __future__ import annotations

from pathlib import Path

import click

OUTTYPE_CHOICES = ("f32", "f16", "bf16", "q8_0")


@click.command("hf-to-gguf")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--outtype", type=click.Choice(OUTTYPE_CHOICES), required=True, help="Tensor type of the weight matrices.")
@click.option(
    "--outfile",
    type=click.Path(path_type=Path),
    default=None,
    help="Output file, or a directory for the standard name; {ftype} is replaced by the type. "
    "Default: MODEL_DIR/Name-SizeLabel-Finetune-Version-TYPE.gguf.",
)
@click.option(
    "--split-max-size",
    default=None,
    metavar="SIZE",
    help="Split the output in llama.cpp's format, at most SIZE of tensor data per file (e.g. 500M, 2G).",
)
@click.option(
    "--vocab-pre",
    default=None,
    metavar="NAME",
    help="llama.cpp BPE pre-tokenizer name, for a tokenizer whose probe hash is not a known one.",
)
@click.option("--quiet", is_flag=True, default=False, help="No progress bar.")
def hf_to_gguf(model_dir: Path, outtype: str, outfile: Path | None, split_max_size: str | None, vocab_pre: str | None,
               quiet: bool) -> None:
    """Convert a Hugging Face safetensors checkpoint in MODEL_DIR to GGUF."""
    from quantmill.convert.hf_to_gguf import convert_hf_to_gguf, parse_split_size

    size = parse_split_size(split_max_size) if split_max_size is not None else None
    for path in convert_hf_to_gguf(model_dir, outtype, outfile, size, vocab_pre=vocab_pre, progress=not quiet):
        click.echo(str(path))


@click.command("architectures")
def architectures() -> None:
    """The model families quantmill knows (one record each) and the stages each can go through."""
    from quantmill.convert.arch import families
    from quantmill.convert.arch.base import CAPABILITIES

    header = ["family", "model_type values", *CAPABILITIES]
    click.echo("| " + " | ".join(header) + " |")
    click.echo("|" + "---|" * len(header))
    for arch in families():
        marks = ["yes" if arch.supports(c) else "-" for c in CAPABILITIES]
        click.echo(f"| {arch.name} | {', '.join(arch.model_types)} | " + " | ".join(marks) + " |")
