"""The one verify report: its JSON schema, the markdown parity table and the plot, all written atomically.

``quantmill verify``, the release's verify stage and the model cards all use this module. The
JSON (:func:`report_dict`) is deterministic, so it can be hashed: no timings (they stay apart,
:func:`timings`). Metric names are verify's own (``ppl``, ``delta_ppl_pct``, ``kld_mean``,
``kld_p99``, ``top1_agreement``, ...), the same as the thresholds' ``max_<metric>``/``min_<metric>``.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantmill.atomic import atomic_file, write_text_atomic
from quantmill.verify.parity import device_parity, parity_markdown

if TYPE_CHECKING:
    from quantmill.verify.evaluate import ArtifactResult, VerifyResult

REPORT_VERSION = 3
COMPARISON_FIELDS = ("kld_mean", "kld_stderr", "kld_median", "kld_p99", "kld_max", "top1_agreement", "top1_stderr", "dp_rms")
REFERENCE_NAME = "reference"


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def artifact_record(result: VerifyResult, artifact: ArtifactResult, name: str, shown: Callable[[Path], str]) -> dict[str, Any]:
    """One JSON record: what the artifact is, its figures, the limits it was held to and its verdict."""
    record: dict[str, Any] = {
        "name": name,
        "path": shown(artifact.path),
        "format": artifact.format,
        "quant_type": artifact.quant_type,
        "size_bytes": artifact.size_bytes,
        "bpw": round(artifact.bpw, 6),
        "ppl": _finite(artifact.ppl),
        "ppl_stderr": _finite(artifact.ppl_stderr),
        "delta_ppl_pct": _finite(result.delta_ppl_pct(artifact)),
        "is_reference": artifact.is_reference,
        "n_scored": int(artifact.metrics.get("n_scored", 0)),
        "verdict": "reference" if artifact.is_reference else "pass" if artifact.passed else "FAIL",
        "passed": None if artifact.is_reference else artifact.passed,
        "failures": list(artifact.failures),
        "thresholds": artifact.threshold.model_dump() if artifact.threshold is not None else None,
        "tokenization": artifact.tokenization.as_json() if artifact.tokenization is not None else None,
    }
    for field in COMPARISON_FIELDS:
        record[field] = _finite(artifact.metrics.get(field))
    return record


def report_dict(result: VerifyResult | Sequence[VerifyResult], names: Mapping[Path, str] | None = None,
                shown: Callable[[Path], str] = str) -> dict[str, Any]:
    """The report: ``names`` gives artifacts their names (default: the file name; the reference: ``reference``),
    ``shown`` writes every path (default: as given; a release writes its own relative paths). Given one result per
    device, the first device's figures make the report and ``device_parity`` compares the devices."""
    results = (result,) if not isinstance(result, Sequence) else tuple(result)
    result = results[0]

    def artifact_name(path: Path, is_reference: bool) -> str:
        return REFERENCE_NAME if is_reference else (names or {}).get(path, path.name)

    def name(artifact: ArtifactResult) -> str:
        return artifact_name(artifact.path, artifact.is_reference)

    parity = {"device_parity": device_parity(results, artifact_name)} if len(results) > 1 else {}
    return parity | {
        "version": REPORT_VERSION,
        "reference": shown(result.reference_dir),
        "text": shown(result.text),
        "n_ctx": result.n_ctx,
        "n_chunks": result.n_chunks,
        "n_tokens": result.n_tokens,
        "n_text_tokens": result.n_text_tokens,
        "token_sha256": result.token_sha256,
        "bos_id": result.bos_id,
        "device": result.device,
        "threads": result.threads,
        "reference_logprobs": shown(result.store) if result.store is not None else None,
        "passed": not result.failed,
        "artifacts": [artifact_record(result, a, name(a), shown) for a in result.results],
    }


def report_passed(report: Mapping[str, Any]) -> bool:
    """Every artifact holds its thresholds and, measured on several devices, the devices agree."""
    return bool(report["passed"]) and bool(report.get("device_parity", {}).get("passed", True))


def timings(result: VerifyResult, shown: Callable[[Path], str] = str) -> dict[str, dict[str, float | None]]:
    """Evaluation speed per artifact path: it varies run to run, so it is kept out of the report."""
    return {shown(a.path): {"tokens_per_second": _finite(round(a.tokens_per_second, 3)), "seconds": round(a.seconds, 3)}
            for a in result.results}


def write_json(data: dict[str, Any], path: str | Path) -> Path:
    """``data`` to ``path`` atomically (sorted keys, stable formatting)."""
    path = Path(path)
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def write_json_report(result: VerifyResult | Sequence[VerifyResult], path: str | Path) -> Path:
    return write_json(report_dict(result), path)


def _cell(value: float | None, fmt: str) -> str:
    return format(value, fmt) if value is not None and math.isfinite(value) else "—"


def parity_table(report: Mapping[str, Any], speeds: Mapping[str, float | None] | None = None) -> str:
    """The parity table of a report, the reference first; a tok/s column when ``speeds`` (by path) is given."""
    threads = report.get("threads")
    lines = [
        f"Measured on {Path(report['text']).name}: {report['n_chunks']} chunks of {report['n_ctx']} tokens "
        f"({report['n_tokens']} of the text's {report['n_text_tokens']} tokens, sha256 {report['token_sha256'][:12]}), "
        f"{str(report.get('device', 'cpu')).upper()}, {threads or 'all'} threads; KLD and top-1 against the "
        "reference's stored distributions",
        "",
        "| artifact | type | size MiB | bpw | ppl ± stderr | Δppl % | mean KLD | 99% KLD | same top % | verdict |"
        + (" tok/s |" if speeds is not None else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|" + ("---:|" if speeds is not None else ""),
    ]
    for art in report["artifacts"]:
        top1 = art.get("top1_agreement")
        row = (f"| {art['name']} | {art['quant_type'] or art['format']} | {art['size_bytes'] / 2**20:.2f} "
               f"| {art['bpw']:.3f} | {_cell(art['ppl'], '.4f')} ± {_cell(art['ppl_stderr'], '.4f')} "
               f"| {_cell(art['delta_ppl_pct'], '+.3f')} | {_cell(art.get('kld_mean'), '.5f')} "
               f"| {_cell(art.get('kld_p99'), '.4f')} | {_cell(100.0 * top1 if top1 is not None else None, '.2f')} "
               f"| {art['verdict']} |")
        lines.append(row + (f" {_cell(speeds.get(art['path']), '.1f')} |" if speeds is not None else ""))
    for art in report["artifacts"]:
        check = art.get("tokenization")
        if check is not None and not check["identical"]:
            changed = 100 * check["changed_tokens"] / max(1, check["reference_tokens"])
            lines.append(f"\n{art['name']}: its own tokenizer gives {check['artifact_tokens']} tokens of the text vs the "
                         f"reference's {check['reference_tokens']} ({changed:.3f} % changed, from token "
                         f"{check['first_difference']}); its figures are on the reference's ids")
    for art in report["artifacts"]:
        if art["passed"] is False:
            lines.append(f"\n{art['name']} fails its {art['quant_type'] or art['format']} thresholds: "
                         f"{'; '.join(art['failures'])}")
    if "device_parity" in report:
        lines.append("\n" + parity_markdown(report["device_parity"]))
    return "\n".join(lines)


def markdown_table(result: VerifyResult | Sequence[VerifyResult]) -> str:
    """:func:`parity_table` of ``result``'s report (one result per device: with the device table), with each artifact's
    speed on the first device."""
    first = result if not isinstance(result, Sequence) else result[0]
    return parity_table(report_dict(result), {path: t["tokens_per_second"] for path, t in timings(first).items()})


# marker style per artifact format: one chart for GGUF and GPTQ alike
_STYLES = {"gguf": ("o", "tab:blue", "GGUF"), "gptq": ("s", "tab:orange", "GPTQ"), "hf": ("D", "tab:green", "HF checkpoint")}


def write_plot(report: Mapping[str, Any], path: str | Path, title: str | None = None) -> Path:
    """bits per weight vs mean KLD (left) and vs Δppl % (right), one point per artifact, the reference starred."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    path = Path(path)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    seen: set[str] = set()
    artifacts = [a for a in report["artifacts"] if not a["is_reference"]]
    for art in artifacts:
        marker, colour, label = _STYLES.get(art["format"], ("^", "tab:gray", art["format"]))
        kld, delta = (math.nan if art.get(k) is None else art[k] for k in ("kld_mean", "delta_ppl_pct"))
        for axis, value in ((left, kld), (right, delta)):
            axis.scatter(art["bpw"], value, marker=marker, color=colour, edgecolors="black" if art["passed"] else "red",
                         linewidths=0.6 if art["passed"] else 1.8, zorder=3, label=None if label in seen else label)
            axis.annotate(art["quant_type"], (art["bpw"], value), textcoords="offset points", xytext=(4, 4), fontsize=7)
        seen.add(label)
    reference = next(a for a in report["artifacts"] if a["is_reference"])
    for axis in (left, right):
        axis.scatter(reference["bpw"], 0.0, marker="*", s=160, color="gold", edgecolors="black", zorder=4,
                     label=f"fp16 reference ({reference['quant_type']})")
        axis.set_xlabel("bits per weight")
        axis.grid(True, alpha=0.3)
    left.set_ylabel("mean KL divergence vs reference (nats)")
    if any((a.get("kld_mean") or 0) > 0 for a in artifacts):
        left.set_yscale("symlog", linthresh=1e-4)
    right.set_ylabel("Δ perplexity vs reference (%)")
    left.legend(fontsize=8, loc="upper right")
    fig.suptitle(title or f"{Path(report['reference']).name}: quality vs size ({report['n_chunks']}×{report['n_ctx']} "
                 f"tokens of {Path(report['text']).name})", fontsize=10)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})  # no version string: same figures, same bytes
    plt.close(fig)
    return path


def write_report(result: VerifyResult | Sequence[VerifyResult], directory: str | Path, stem: str = "report") -> dict[str, Path]:
    """``stem.md`` (with speeds), ``stem.json`` and ``stem.png`` in ``directory``."""
    directory = Path(directory)
    report = report_dict(result)
    md = directory / f"{stem}.md"
    write_text_atomic(md, markdown_table(result) + f"\n\n![quality vs size]({stem}.png)\n")
    return {"markdown": md, "json": write_json(report, directory / f"{stem}.json"),
            "png": write_plot(report, directory / f"{stem}.png")}
