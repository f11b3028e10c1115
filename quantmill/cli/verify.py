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
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Also write the figures as JSON, one record per artifact.")
@click.option("--report-dir", type=click.Path(path_type=Path), default=None,
              help="Write report.md, report.json and report.png (bpw vs KLD and Δppl) there.")
@click.option("--reference-logprobs", "store", type=click.Path(path_type=Path), default=None,
              help="Where the reference's log-probs are stored (llama-perplexity's --kl-divergence-base format); "
                   "reused when it matches [default: a file in the cache keyed by reference and tokens].")
@click.option("--thresholds", "thresholds_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help='JSON file of limits per quant type, e.g. {"Q4_K_M": {"max_kld_mean": 0.2, "min_top1_agreement": 0.8}}.')
@click.option("--threshold", "threshold_options", multiple=True, metavar="TYPE:FIELD=VALUE",
              help="Override one limit (fields: max_kld_mean, min_top1_agreement, max_delta_ppl_pct); repeatable.")
@click.option("--threads", type=int, default=None, help="CPU threads [default: all this process may use].")
@click.option("--batch-chunks", type=int, default=None,
              help="Chunks evaluated per model call [default: 2048 // n-ctx, as llama-perplexity's batch of 2048].")
@click.option("--max-chunks", type=int, default=None, help="Evaluate only the first N chunks.")
@click.option("--devices", "--device", "devices", default="cpu", show_default=True, metavar="LIST",
              help="Where to run, comma-separated (cpu, cuda, cuda:N, auto); with two (cpu,cuda) every artifact is "
                   "measured on both and the report compares them (perplexity within 0.2 %, mean KLD within 5 %).")
def verify(
    artifacts: tuple[Path, ...],
    reference_dir: Path,
    text: Path,
    n_ctx: int,
    json_path: Path | None,
    report_dir: Path | None,
    store: Path | None,
    thresholds_file: Path | None,
    threshold_options: tuple[str, ...],
    threads: int | None,
    batch_chunks: int | None,
    max_chunks: int | None,
    devices: str,
) -> None:
    """Measure ARTIFACTS (GGUF files, GPTQ and HF checkpoints) against the fp16 reference on the same tokens.

    Perplexity, mean and 99th-percentile KL divergence, top-1 agreement, and a verdict per artifact
    against its quant type's thresholds. Exit code 1 when an artifact fails them, 2 on bad input.
    """
    import sys

    from quantmill.atomic import ensure_writable_dir
    from quantmill.device import resolve_devices
    from quantmill.errors import UserInputError, VerificationFailed
    from quantmill.outputs import check_output, json_with_keys
    from quantmill.verify.backends.base import BackendOptions
    from quantmill.verify.evaluate import verify_on_devices
    from quantmill.verify.logprob_store import MAGIC
    from quantmill.verify.report import markdown_table, report_dict, report_passed, write_json_report, write_report
    from quantmill.verify.thresholds import load_thresholds

    if batch_chunks is not None and batch_chunks < 1:
        raise UserInputError(f"--batch-chunks {batch_chunks}: must be at least 1")
    if threads is not None and threads < 1:
        raise UserInputError(f"--threads {threads}: must be at least 1")
    table = load_thresholds(thresholds_file, threshold_options)
    on = resolve_devices([d.strip() for d in devices.split(",") if d.strip()])  # a missing GPU refused before any work
    # the output rule, before the evaluation: never an input, never a file or directory verify did not write
    inputs = [*artifacts, reference_dir, text, *([thresholds_file] if thresholds_file is not None else [])]
    report_json = json_with_keys("version", "reference", "artifacts")

    def logprob_store_signature(path: Path) -> bool:
        with open(path, "rb") as handle:
            return handle.read(len(MAGIC)) == MAGIC
    if json_path is not None:
        check_output(json_path, kind="file", flag="--json", command="verify", inputs=inputs, owned=report_json)
    if store is not None:  # an existing store is read (ours or llama-perplexity's), a stale one of ours replaced
        check_output(store, kind="file", flag="--reference-logprobs", command="verify", inputs=inputs,
                     owned=logprob_store_signature)
    if report_dir is not None:
        check_output(report_dir, kind="dir", flag="--report-dir", command="verify", inputs=inputs,
                     owned=lambda d: report_json(d / "report.json"))
    for target in (json_path, store):
        if target is not None:
            ensure_writable_dir(target.resolve().parent)  # fail now, not after the evaluation
    if report_dir is not None:
        ensure_writable_dir(report_dir.resolve())
    options = BackendOptions(threads=threads, chunks_per_batch=batch_chunks)
    result = verify_on_devices(artifacts, reference_dir, text, n_ctx, options, on, max_chunks=max_chunks,
                               progress=sys.stderr.isatty(), store=store, thresholds=table)
    click.echo(markdown_table(result))
    if json_path is not None:
        write_json_report(result, json_path)
        click.echo(f"wrote {json_path}")
    if report_dir is not None:
        for path in write_report(result, report_dir).values():
            click.echo(f"wrote {path}")
    failed = result[0].failed
    if failed:
        names = ", ".join(a.path.name for a in failed)
        raise VerificationFailed(f"{len(failed)} of {len(result[0].artifacts)} artifacts fail their thresholds: {names}")
    if not report_passed(report_dict(result)):
        raise VerificationFailed(f"the devices {', '.join(on)} disagree beyond the parity limits (see the device table)")
