"""``quantmill merge``: LoRA/DoRA adapters merged into a base checkpoint, a thin click command over quantmill.convert.merge."""
from __future__ import annotations

from pathlib import Path

import click

DTYPE_CHOICES = ("float32", "float16", "bfloat16")


@click.command("merge")
@click.argument("base", type=click.Path(path_type=Path))
@click.option("--adapter", "adapters", multiple=True, required=True, metavar="DIR[:WEIGHT]",
              help="PEFT adapter folder, optionally with a weight that scales it; repeat to apply several in order.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Output directory (written atomically).")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=None, help="Output dtype; default: each base tensor's own.")
@click.option("--allow-pickle", is_flag=True, help="Also load pickle adapter_model.bin files (can run code; trusted sources only).")
@click.option("--dequantize-4bit-base", is_flag=True,
              help="Merge into the dequantized weights of a bitsandbytes 4-bit base instead of refusing (recorded as a warning).")
@click.option("--max-shard-size", default="5GB", show_default=True, metavar="SIZE",
              help="Largest safetensors file before the output is sharded.")
def merge(base: Path, adapters: tuple[str, ...], out_dir: Path, dtype: str | None, allow_pickle: bool,
          dequantize_4bit_base: bool, max_shard_size: str) -> None:
    """Merge LoRA/DoRA adapters into the Hugging Face checkpoint BASE."""
    from quantmill.convert.merge.adapter import parse_adapter_spec
    from quantmill.convert.merge.merge import merge_adapters
    from quantmill.convert.safetensors_io import parse_size

    result = merge_adapters(base, [parse_adapter_spec(spec) for spec in adapters], out_dir, dtype, allow_pickle=allow_pickle,
                            dequantize_4bit_base=dequantize_4bit_base, max_shard_bytes=parse_size(max_shard_size))
    for warning in result.warnings:
        click.echo(f"quantmill: warning: {warning}", err=True)
    click.echo(str(result.out_dir))
