"""The verify report: a markdown table for people, a JSON file for machines, a PNG plot; all written atomically."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from quantmill.atomic import atomic_file, write_text_atomic
from quantmill.verify.evaluate import ArtifactResult, VerifyResult

REPORT_VERSION = 2
COMPARISON_FIELDS = ("kld_mean", "kld_stderr", "kld_median", "kld_p99", "kld_max", "top1_agreement", "top1_stderr", "dp_rms")


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _verdict(artifact: ArtifactResult) -> str:
    if artifact.is_reference:
        return "reference"
    return "pass" if artifact.passed else "FAIL"


def artifact_record(result: VerifyResult, artifact: ArtifactResult) -> dict[str, Any]:
    """One JSON record: the fields every consumer relies on, then the comparison and the verdict."""
    record: dict[str, Any] = {
        "path": str(artifact.path),
        "format": artifact.format,
        "quant_type": artifact.quant_type,
        "size_bytes": artifact.size_bytes,
        "bpw": round(artifact.bpw, 6),
        "ppl": _finite(artifact.ppl),
        "ppl_stderr": _finite(artifact.ppl_stderr),
        "delta_ppl_pct": _finite(result.delta_ppl_pct(artifact)),
        "is_reference": artifact.is_reference,
        "n_scored": int(artifact.metrics.get("n_scored", 0)),
        "tokens_per_second": _finite(round(artifact.tokens_per_second, 3)),
        "verdict": _verdict(artifact),
        "failures": list(artifact.failures),
        "thresholds": artifact.threshold.__dict__ if artifact.threshold is not None else None,
        "tokenization": artifact.tokenization.as_json() if artifact.tokenization is not None else None,
    }
    for name in COMPARISON_FIELDS:
        record[name] = _finite(artifact.metrics.get(name))
    return record


def report_dict(result: VerifyResult) -> dict[str, Any]:
    return {
        "version": REPORT_VERSION,
        "reference": str(result.reference_dir),
        "text": str(result.text),
        "n_ctx": result.n_ctx,
        "n_chunks": result.n_chunks,
        "n_tokens": result.n_tokens,
        "n_text_tokens": result.n_text_tokens,
        "token_sha256": result.token_sha256,
        "bos_id": result.bos_id,
        "reference_logprobs": str(result.store) if result.store is not None else None,
        "passed": not result.failed,
        "artifacts": [artifact_record(result, a) for a in result.results],
    }


def write_json_report(result: VerifyResult, path: str | Path) -> Path:
    """Write :func:`report_dict` to ``path`` atomically (sorted keys, stable formatting)."""
    path = Path(path)
    write_text_atomic(path, json.dumps(report_dict(result), indent=2, sort_keys=True) + "\n")
    return path


def _cell(value: float | None, fmt: str) -> str:
    return format(value, fmt) if value is not None and math.isfinite(value) else "—"


def markdown_table(result: VerifyResult) -> str:
    """One row per artifact, the reference first: size, bpw, ppl, Δppl, KLD, top-1, verdict, speed."""
    lines = [
        f"Measured on {result.text.name}: {result.n_chunks} chunks of {result.n_ctx} tokens ({result.n_tokens} of the "
        f"text's {result.n_text_tokens} tokens, sha256 {result.token_sha256[:12]}); KLD and top-1 against the "
        "reference's stored distributions",
        "",
        "| file | type | size MiB | bpw | ppl ± stderr | Δppl % | mean KLD | 99% KLD | same top % | verdict | tok/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for artifact in result.results:
        name = artifact.path.name + (" (reference)" if artifact.is_reference else "")
        metrics = artifact.metrics
        top1 = metrics.get("top1_agreement")
        lines.append(
            f"| {name} | {artifact.quant_type or artifact.format} | {artifact.size_bytes / 2**20:.2f} | {artifact.bpw:.3f} "
            f"| {artifact.ppl:.4f} ± {artifact.ppl_stderr:.4f} | {result.delta_ppl_pct(artifact):+.3f} "
            f"| {_cell(metrics.get('kld_mean'), '.5f')} | {_cell(metrics.get('kld_p99'), '.4f')} "
            f"| {_cell(100.0 * top1 if top1 is not None else None, '.2f')} | {_verdict(artifact)} "
            f"| {artifact.tokens_per_second:.1f} |"
        )
    for artifact in result.results:
        check = artifact.tokenization
        if check is not None and not check.identical:
            lines.append(f"\n{artifact.path.name}: its own tokenizer gives {check.artifact_tokens} tokens of the text vs the "
                         f"reference's {check.reference_tokens} ({100 * check.difference:.3f} % changed, from token "
                         f"{check.first_difference}); its figures are on the reference's ids")
    for artifact in result.failed:
        lines.append(f"\n{artifact.path.name} fails its {artifact.quant_type} thresholds: {'; '.join(artifact.failures)}")
    return "\n".join(lines)


# marker style per artifact format: one chart for GGUF and GPTQ alike
_STYLES = {"gguf": ("o", "tab:blue", "GGUF"), "gptq": ("s", "tab:orange", "GPTQ"), "hf": ("D", "tab:green", "HF checkpoint")}


def write_plot(result: VerifyResult, path: str | Path, title: str | None = None) -> Path:
    """bits per weight vs mean KLD (left) and vs Δppl % (right), one point per artifact, the reference starred."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    path = Path(path)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    seen: set[str] = set()
    for artifact in result.artifacts:
        marker, colour, label = _STYLES.get(artifact.format, ("^", "tab:gray", artifact.format))
        kld = artifact.metrics.get("kld_mean", math.nan)
        for axis, value in ((left, kld), (right, result.delta_ppl_pct(artifact))):
            axis.scatter(artifact.bpw, value, marker=marker, color=colour, edgecolors="black" if artifact.passed else "red",
                         linewidths=0.6 if artifact.passed else 1.8, zorder=3, label=None if label in seen else label)
            axis.annotate(artifact.quant_type, (artifact.bpw, value), textcoords="offset points", xytext=(4, 4), fontsize=7)
        seen.add(label)
    reference = result.reference
    for axis in (left, right):
        axis.scatter(reference.bpw, 0.0, marker="*", s=160, color="gold", edgecolors="black", zorder=4,
                     label=f"fp16 reference ({reference.quant_type})")
        axis.set_xlabel("bits per weight")
        axis.grid(True, alpha=0.3)
    left.set_ylabel("mean KL divergence vs reference (nats)")
    if any(a.metrics.get("kld_mean", 0) > 0 for a in result.artifacts):
        left.set_yscale("symlog", linthresh=1e-4)
    right.set_ylabel("Δ perplexity vs reference (%)")
    left.legend(fontsize=8, loc="upper right")
    fig.suptitle(title or f"{result.reference_dir.name}: quality vs size ({result.n_chunks}×{result.n_ctx} tokens of "
                 f"{result.text.name})", fontsize=10)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})  # no version string: same figures, same bytes
    plt.close(fig)
    return path


def write_report(result: VerifyResult, directory: str | Path, stem: str = "report") -> dict[str, Path]:
    """``stem.md``, ``stem.json`` and ``stem.png`` in ``directory``."""
    directory = Path(directory)
    md = directory / f"{stem}.md"
    write_text_atomic(md, markdown_table(result) + f"\n\n![quality vs size]({stem}.png)\n")
    return {"markdown": md, "json": write_json_report(result, directory / f"{stem}.json"),
            "png": write_plot(result, directory / f"{stem}.png")}
