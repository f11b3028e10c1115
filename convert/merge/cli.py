"""``quantmill merge`` and ``quantmill convert lora-to-gguf``: thin click commands over the library."""
from __future__ import annotations

from pathlib import Path

import click

DTYPE_CHOICES = ("float32", "float16", "bfloat16")
GGUF_OUTTYPES = ("f32", "f16", "bf16")


@click.command("merge")
@click.argument("base", type=click.Path(path_type=Path))
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    required=True,
    metavar="DIR[:WEIGHT]",
    help="PEFT adapter folder, optionally with a weight that scales it; repeat to apply several in order.",
)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Output directory (written atomically).")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=None, help="Output dtype; default: each base tensor's own.")
@click.option("--allow-pickle", is_flag=True, help="Also load pickle adapter_model.bin files (can run code; trusted sources only).")
@click.option(
    "--dequantize-4bit-base",
    is_flag=True,
    help="Merge into the dequantized weights of a bitsandbytes 4-bit base instead of refusing (recorded as a warning).",
)
@click.option("--max-shard-size", default="5GB", show_default=True, metavar="SIZE", help="Largest safetensors file before the output is sharded.")
def merge(
    base: Path, adapters: tuple[str, ...], out_dir: Path, dtype: str | None, allow_pickle: bool, dequantize_4bit_base: bool, max_shard_size: str
) -> None:
    """Merge LoRA/DoRA adapters into the Hugging Face checkpoint BASE."""
    from quantmill.convert.merge.adapter import parse_adapter_spec
    from quantmill.convert.merge.merge import merge_adapters
    from quantmill.convert.merge.writer import parse_size

    result = merge_adapters(
        base,
        [parse_adapter_spec(spec) for spec in adapters],
        out_dir,
        dtype,
        allow_pickle=allow_pickle,
        dequantize_4bit_base=dequantize_4bit_base,
        max_shard_bytes=parse_size(max_shard_size),
    )
    for warning in result.warnings:
        click.echo(f"quantmill: warning: {warning}", err=True)
    click.echo(str(result.out_dir))


@click.command("lora-to-gguf")
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option("--base", "base_dir", type=click.Path(path_type=Path), required=True, help="The base model directory (config.json; weights only for checks).")
@click.option("--outfile", type=click.Path(path_type=Path), required=True, help="The GGUF LoRA file to write.")
@click.option("--outtype", type=click.Choice(GGUF_OUTTYPES), default="f32", show_default=True, help="Tensor type of lora_a/lora_b.")
@click.option("--allow-pickle", is_flag=True, help="Also load a pickle adapter_model.bin (can run code; trusted sources only).")
def lora_to_gguf(adapter: Path, base_dir: Path, outfile: Path, outtype: str, allow_pickle: bool) -> None:
    """Export the PEFT LoRA adapter in ADAPTER as a llama.cpp GGUF LoRA."""
    from quantmill.convert.merge.gguf_lora import export_lora_gguf

    click.echo(str(export_lora_gguf(adapter, base_dir, outfile, outtype, allow_pickle=allow_pickle)))
