"""``quantmill quantize gguf``: a thin click command over :mod:`quantmill.quantize.gguf.libllama`."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from quantmill.quantize.gguf.types import ALIASES, FILE_TYPES


def _type_help() -> str:
    rows = [f"{t.name} ({t.nominal_bpw:.2f} bpw{', needs imatrix' if t.needs_imatrix else ''})" for t in FILE_TYPES.values()]
    aliases = ", ".join(f"{a}={b}" for a, b in ALIASES.items())
    return f"llama.cpp file type: {'; '.join(rows)}. Aliases: {aliases}."


@click.command("gguf")
@click.argument("model", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--type", "type_name", required=True, metavar="TYPE", help=_type_help())
@click.option("--out", "output", type=click.Path(path_type=Path), default=None,
              help="Output file [default: the input's name with its type suffix replaced, e.g. X-F16.gguf → X-Q4_K_M.gguf].")
@click.option("--override-tensor", "overrides", multiple=True, metavar="REGEX=TYPE",
              help="Give tensors whose name matches REGEX the ggml type TYPE (e.g. 'ffn_down=Q6_K'); repeatable, first match wins.")
@click.option("--imatrix", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Importance matrix GGUF (from `quantmill calibrate` or llama-imatrix); required by the IQ types.")
@click.option("--threads", type=int, default=None, help="Quantization threads [default: all hardware threads].")
@click.option("--allow-requantize", is_flag=True, default=False,
              help="Accept an input whose weights are already quantized (quality compounds the loss).")
def quantize_gguf(
    model: Path,
    type_name: str,
    output: Path | None,
    overrides: tuple[str, ...],
    imatrix: Path | None,
    threads: int | None,
    allow_requantize: bool,
) -> None:
    """Quantize the GGUF file MODEL with llama.cpp's own quantizer (libllama)."""
    from quantmill.quantize.gguf.inspect import format_summary
    from quantmill.quantize.gguf.libllama import parse_overrides, quantize_gguf as run_quantize

    result = run_quantize(
        model,
        type_name,
        output,
        overrides=parse_overrides(overrides),
        threads=threads,
        allow_requantize=allow_requantize,
        imatrix=imatrix,
        progress=sys.stderr.isatty(),
    )
    summary = result.summary
    click.echo(
        f"wrote {result.output} ({result.file_type.name}, {summary.file_size / 2**20:.2f} MiB, "
        f"{summary.bpw:.3f} bpw, {result.seconds:.1f} s)"
    )
    click.echo(format_summary(summary))
    if result.fallbacks:
        click.echo(f"{len(result.fallbacks)} tensor(s) fell back: rows not a multiple of the block size:")
        for fb in result.fallbacks:
            click.echo(f"  {fb.tensor}: row length {fb.row_length}, {fb.wanted} -> {fb.used}")
