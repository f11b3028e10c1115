"""``quantmill quantize``: gguf (llama.cpp's own quantizer, libllama) and gptq (one checkpoint per branch)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from quantmill.calib_data.bundled import BUNDLED_SPEC
from quantmill.cli.options import checkpoint_dir_option, max_memory_option

BRANCH_HELP = (
    "a branch to write, as BITSbit-GROUP[-actorder][-asym][-static] with GROUP 32g/64g/128g/none, "
    "e.g. 4bit-128g-actorder, 8bit-none-actorder, 3bit-64g; NAME=SPEC writes it to branch NAME (e.g. main=4bit-128g-actorder). "
    "Repeat for several branches; they share one streaming pass."
)


class _TypeOption(click.Option):
    """``--type``, whose help (the file-type table, with libggml's sizes) is built only when help is shown."""

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        from quantmill.quantize.gguf.types import ALIASES, FILE_TYPES

        rows = [f"{t.name} ({t.nominal_bpw:.2f} bpw{', needs imatrix' if t.needs_imatrix else ''})" for t in FILE_TYPES.values()]
        self.help = f"llama.cpp file type: {'; '.join(rows)}. Aliases: {', '.join(f'{a}={b}' for a, b in ALIASES.items())}."
        return super().get_help_record(ctx)


@click.group("quantize")
def quantize() -> None:
    """Quantize a model (GGUF through libllama; GPTQ)."""


@quantize.command("gguf")
@click.argument("model", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--type", "type_name", cls=_TypeOption, required=True, metavar="TYPE")
@click.option("--out", "output", type=click.Path(path_type=Path), default=None,
              help="Output file [default: the input's name with its type suffix replaced, e.g. X-F16.gguf → X-Q4_K_M.gguf].")
@click.option("--override-tensor", "overrides", multiple=True, metavar="REGEX=TYPE",
              help="Give tensors whose name matches REGEX the ggml type TYPE (e.g. 'ffn_down=Q6_K'); repeatable, first match wins.")
@click.option("--imatrix", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Importance matrix GGUF (from `quantmill calibrate` or llama-imatrix); required by the IQ types.")
@click.option("--threads", type=int, default=None, help="Quantization threads [default: all hardware threads].")
@click.option("--allow-requantize", is_flag=True, default=False,
              help="Accept an input whose weights are already quantized (quality compounds the loss).")
def quantize_gguf(model: Path, type_name: str, output: Path | None, overrides: tuple[str, ...], imatrix: Path | None,
                  threads: int | None, allow_requantize: bool) -> None:
    """Quantize the GGUF file MODEL with llama.cpp's own quantizer (libllama)."""
    from quantmill.quantize.gguf.inspect import format_summary
    from quantmill.quantize.gguf.libllama import parse_overrides
    from quantmill.quantize.gguf.libllama import quantize_gguf as run_quantize

    result = run_quantize(model, type_name, output, overrides=parse_overrides(overrides), threads=threads,
                          allow_requantize=allow_requantize, imatrix=imatrix, progress=sys.stderr.isatty())
    summary = result.summary
    click.echo(
        f"wrote {result.output} ({result.file_type.name}, {summary.file_size / 2**20:.2f} MiB, "
        f"{summary.bpw:.3f} bpw, {result.seconds:.1f} s)"
    )
    click.echo(format_summary(summary))
    if result.fallbacks:  # one line per (wanted, used, row length) rather than per tensor (180 on SmolLM2)
        groups: dict[tuple[str, str, int], list[str]] = {}
        for fb in result.fallbacks:
            groups.setdefault((fb.wanted, fb.used, fb.row_length), []).append(fb.tensor)
        click.echo("\n".join([f"{len(result.fallbacks)} tensor(s) fell back: rows not a multiple of the block size:",
                              *(f"  {len(names)} x {wanted} -> {used} (row length {row}), e.g. {names[0]}"
                                for (wanted, used, row), names in sorted(groups.items()))]))


@quantize.command("gptq")
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
@checkpoint_dir_option
@max_memory_option
@click.option("--no-progress", is_flag=True, help="hide the progress bar")
def quantize_gptq(
    model_dir: Path, out_dir: Path, branches: tuple[str, ...], calib: str, text_field: str, calib_samples: int,
    calib_seqlen: int, seed: int, damp: float, no_true_sequential: bool, max_shard_size: str, checkpoint_format: str,
    device: str, threads: int | None, checkpoint_dir: Path | None, max_memory: int | None, no_progress: bool,
) -> None:
    """Quantize MODEL_DIR with GPTQ into one checkpoint per --branch (v1 AutoGPTQ/GPTQModel or compressed-tensors)."""
    from quantmill.convert.safetensors_io import parse_size
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
        max_shard_bytes=parse_size(max_shard_size), progress=not no_progress, checkpoint_dir=checkpoint_dir,
        max_memory=max_memory,
    )
    cal = result.calibration
    click.echo(f"calibration: {cal.samples} x {cal.seqlen} tokens from {cal.source} (seed {cal.seed}), sha256 {cal.sha256}")
    for branch in result.branches:
        notes = [f"{k}: {len(v)}" for k, v in branch.meta().items() if v]
        click.echo(f"wrote {branch.directory} ({', '.join(branch.files)})" + (f" [{'; '.join(notes)}]" if notes else ""))
