"""The verify report: a markdown table for people, a JSON file for machines (written atomically)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from quantmill.atomic import write_text_atomic
from quantmill.verify.evaluate import ArtifactResult, VerifyResult

REPORT_VERSION = 1


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def artifact_record(result: VerifyResult, artifact: ArtifactResult) -> dict[str, Any]:
    """One JSON record: the fields every consumer relies on, then extras."""
    return {
        "path": str(artifact.path),
        "format": artifact.format,
        "size_bytes": artifact.size_bytes,
        "bpw": round(artifact.bpw, 6),
        "ppl": _finite(artifact.ppl),
        "ppl_stderr": _finite(artifact.ppl_stderr),
        "delta_ppl_pct": _finite(result.delta_ppl_pct(artifact)),
        "is_reference": artifact.is_reference,
        "n_scored": int(artifact.metrics.get("n_scored", 0)),
        "tokens_per_second": _finite(round(artifact.tokens_per_second, 3)),
    }


def report_dict(result: VerifyResult) -> dict[str, Any]:
    return {
        "version": REPORT_VERSION,
        "reference": str(result.reference_dir),
        "text": str(result.text),
        "n_ctx": result.n_ctx,
        "n_chunks": result.n_chunks,
        "n_tokens": result.n_tokens,
        "token_sha256": result.token_sha256,
        "bos_id": result.bos_id,
        "artifacts": [artifact_record(result, a) for a in result.results],
    }


def write_json_report(result: VerifyResult, path: str | Path) -> Path:
    """Write :func:`report_dict` to ``path`` atomically (sorted keys, stable formatting)."""
    path = Path(path)
    write_text_atomic(path, json.dumps(report_dict(result), indent=2, sort_keys=True) + "\n")
    return path


def markdown_table(result: VerifyResult) -> str:
    """| file | format | size | bpw | ppl ± stderr | Δppl % | tok/s |, the reference first."""
    lines = [
        f"Perplexity on {result.text.name}: {result.n_chunks} chunks of {result.n_ctx} tokens "
        f"({result.n_tokens} tokens, sha256 {result.token_sha256[:12]})",
        "",
        "| file | format | size MiB | bpw | ppl ± stderr | Δppl % | tok/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for artifact in result.results:
        name = artifact.path.name + (" (reference)" if artifact.is_reference else "")
        lines.append(
            f"| {name} | {artifact.format} | {artifact.size_bytes / 2**20:.2f} | {artifact.bpw:.3f} "
            f"| {artifact.ppl:.4f} ± {artifact.ppl_stderr:.4f} | {result.delta_ppl_pct(artifact):+.3f} "
            f"| {artifact.tokens_per_second:.1f} |"
        )
    return "\n".join(lines)
