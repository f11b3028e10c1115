"""``quantmill quantize``: gguf (llama.cpp's own quantizer, libllama) and gptq (one checkpoint per branch)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from quantmill.calib_data.bundled import BUNDLED_SPEC
from quantmill.cli.options import checkpoint_dir_option, device_option, max_memory_option, size_callback

if TYPE_CHECKING:
    from quantmill.quantize.gguf.libllama import QuantizeResult

BRANCH_HELP = (
    "a branch to write, as BITSbit-GROUP[-actorder][-asym][-static][-mse] with GROUP 32g/64g/128g/none, "
    "e.g. 4bit-128g-actorder, 8bit-none-actorder, 3bit-64g (mse: each group's scale/zero by a clipping search weighted "
    "by the inputs' energy instead of min/max); NAME=SPEC writes it to branch NAME (e.g. main=4bit-128g-actorder). "
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
@click.option("--type", "type_name", cls=_TypeOption, default=None, metavar="TYPE")
@click.option("--out", "output", type=click.Path(path_type=Path), default=None,
              help="Output file [default: the input's name with its type suffix replaced, e.g. X-F16.gguf → X-Q4_K_M.gguf].")
@click.option("--override-tensor", "overrides", multiple=True, metavar="REGEX=TYPE",
              help="Give tensors whose name matches REGEX the ggml type TYPE (e.g. 'ffn_down=Q6_K'); repeatable, first match wins.")
@click.option("--imatrix", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Importance matrix GGUF (from `quantmill calibrate` or llama-imatrix); required by the IQ types.")
@click.option("--threads", type=int, default=None, help="Quantization threads [default: all hardware threads].")
@click.option("--allow-requantize", is_flag=True, default=False,
              help="Accept an input whose weights are already quantized (quality compounds the loss).")
@click.option("--target-size", callback=size_callback, default=None, metavar="SIZE",
              help="Instead of --type: a mix of per-tensor types chosen for a file of at most SIZE (e.g. 95MiB, 4.5GB), "
                   "the least imatrix-weighted error for the bytes; needs --imatrix.")
@click.option("--target-bpw", type=float, default=None, metavar="BPW",
              help="Instead of --type: a mix for at most BPW bits per weight of tensor data (as llama.cpp counts them).")
@click.option("--mix-name", default=None, help="The mix's name (file name and metadata) [default: QM-<bpw> or QM-<MiB>MiB].")
@click.option("--refine", "refine_with", type=click.Path(path_type=Path, file_okay=False), default=None, metavar="HF_DIR",
              help="Weigh each tensor's error by the KL divergence it causes alone, measured on the float model HF_DIR "
                   "(the checkpoint MODEL was converted from) over a short calibration text.")
@click.option("--refine-tokens", type=(int, int), default=None, metavar="SAMPLES SEQLEN",
              help="The short text for --refine: SAMPLES sequences of SEQLEN tokens of the bundled calibration corpus "
                   "(seed 0) [default: 2 256].")
@click.option("--gains-from", "gains_from", type=click.Path(path_type=Path, dir_okay=False), default=None, metavar="REPORT",
              help="Take the KLD gains from the --report of an earlier --refine'd mix of the same GGUF (they do not "
                   "depend on the budget) instead of measuring them again.")
@click.option("--report", "report_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the mix (type per tensor, predicted error/KLD, how it was chosen) to this JSON file.")
def quantize_gguf(model: Path, type_name: str | None, output: Path | None, overrides: tuple[str, ...], imatrix: Path | None,
                  threads: int | None, allow_requantize: bool, target_size: int | None, target_bpw: float | None,
                  mix_name: str | None, refine_with: Path | None, refine_tokens: tuple[int, int] | None, gains_from: Path | None,
                  report_path: Path | None) -> None:
    """Quantize the GGUF file MODEL with llama.cpp's own quantizer (libllama): one --type, or a mix for a budget."""
    from quantmill.errors import UserInputError
    from quantmill.quantize.gguf.inspect import format_summary
    from quantmill.quantize.gguf.libllama import parse_overrides
    from quantmill.quantize.gguf.libllama import quantize_gguf as run_quantize

    mixing = target_size is not None or target_bpw is not None
    if mixing == (type_name is not None):
        raise UserInputError("quantize gguf: pass --type TYPE, or --target-size/--target-bpw for a mix (not both)")
    if mixing:
        result = _quantize_mix(model, output, imatrix, threads, target_size, target_bpw, mix_name, overrides,
                               refine_with, refine_tokens, gains_from, report_path)
    else:
        assert type_name is not None
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


def _quantize_mix(model: Path, output: Path | None, imatrix: Path | None, threads: int | None, target_size: int | None,
                  target_bpw: float | None, mix_name: str | None, overrides: tuple[str, ...], refine_with: Path | None,
                  refine_tokens: tuple[int, int] | None, gains_from: Path | None,
                  report_path: Path | None) -> QuantizeResult:
    from quantmill.errors import UserInputError
    from quantmill.quantize.gguf.mix import MixTarget, choose_mix, write_mix

    if imatrix is None:
        raise UserInputError("--target-size/--target-bpw: a mix is chosen from the importance matrix; pass --imatrix FILE "
                             "(make one with `quantmill calibrate`)")
    if overrides:
        raise UserInputError("--override-tensor: a mix chooses every tensor's type itself; drop the overrides or use --type")
    target = MixTarget(size=target_size, bpw=target_bpw, name=mix_name)
    if report_path is not None:  # before any work: never over an input, the mix itself, or a file that is not a report
        from quantmill.outputs import check_output
        from quantmill.quantize.gguf.mix import is_mix_report, mix_output_path

        check_output(report_path, kind="file", flag="--report", command="quantize gguf", owned=is_mix_report,
                     inputs=[model, imatrix, mix_output_path(model, target, output), *([gains_from] if gains_from else [])])
    gains = None
    if gains_from is not None:
        from quantmill.jsonio import read_json_object

        gains = read_json_object(gains_from, "pass the --report of a --refine'd mix").get("gains")
        if not isinstance(gains, dict):
            raise UserInputError(f"{gains_from}: holds no gains; pass the --report of a mix made with --refine")
    plan = choose_mix(model, imatrix, target, threads=threads or 1, refine_with=refine_with, refine_tokens=refine_tokens,
                      gains=gains, output=output, progress=sys.stderr.isatty())
    result = write_mix(plan, output, threads=threads, progress=sys.stderr.isatty())
    counts = ", ".join(f"{n} {t}" for t, n in plan.type_counts().items())
    what = "predicted mean KLD" if plan.refined else "predicted imatrix-weighted error"
    click.echo(f"mix {target.label} for {target.describe()}: {counts}; {what} {plan.predicted:.5g}; chosen in {plan.seconds:.1f} s")
    if report_path is not None:
        import json

        from quantmill.atomic import write_text_atomic

        record = {**plan.record(), "seconds_to_choose": round(plan.seconds, 2)}
        write_text_atomic(report_path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return result


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
@device_option
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
    from quantmill.device import resolve_device
    from quantmill.errors import UserInputError
    from quantmill.quantize.gptq.api import quantize_gptq as run

    device = resolve_device(device)  # refused before the calibration set is drawn
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
