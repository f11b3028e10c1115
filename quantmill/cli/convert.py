"""``quantmill convert``: hf-to-gguf, gguf-to-hf and lora-to-gguf, thin click commands over quantmill.convert."""
from __future__ import annotations

from pathlib import Path

import click

OUTTYPE_CHOICES = ("f32", "f16", "bf16", "q8_0")
DTYPE_CHOICES = ("float16", "bfloat16", "float32")  # keep in step with safetensors_io.FLOAT_CODES (checked by a test)
LORA_OUTTYPES = ("f32", "f16", "bf16")


@click.group("convert")
def convert() -> None:
    """Convert checkpoints between Hugging Face safetensors and GGUF."""


@convert.command("hf-to-gguf")
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


@convert.command("gguf-to-hf")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Output directory for the Hugging Face checkpoint (an earlier gguf-to-hf output is replaced atomically).")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="float16", show_default=True,
              help="Data type of the dequantized weights.")
@click.option("--quiet", is_flag=True, default=False, help="No progress bar.")
def gguf_to_hf(model: Path, out_dir: Path, dtype: str, quiet: bool) -> None:
    """Dequantize the GGUF file MODEL into a Hugging Face checkpoint (safetensors, config, tokenizer)."""
    from quantmill.convert.gguf_to_hf import gguf_to_hf as run_gguf_to_hf

    click.echo(f"wrote {run_gguf_to_hf(model, out_dir, dtype=dtype, progress=not quiet)}")


@convert.command("lora-to-gguf")
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option("--base", "base_dir", type=click.Path(path_type=Path), required=True,
              help="The base model directory (config.json; weights only for checks).")
@click.option("--outfile", type=click.Path(path_type=Path), required=True, help="The GGUF LoRA file to write.")
@click.option("--outtype", type=click.Choice(LORA_OUTTYPES), default="f32", show_default=True, help="Tensor type of lora_a/lora_b.")
@click.option("--allow-pickle", is_flag=True, help="Also load a pickle adapter_model.bin (can run code; trusted sources only).")
def lora_to_gguf(adapter: Path, base_dir: Path, outfile: Path, outtype: str, allow_pickle: bool) -> None:
    """Export the PEFT LoRA adapter in ADAPTER as a llama.cpp GGUF LoRA."""
    from quantmill.convert.merge.gguf_lora import export_lora_gguf

    click.echo(str(export_lora_gguf(adapter, base_dir, outfile, outtype, allow_pickle=allow_pickle)))
