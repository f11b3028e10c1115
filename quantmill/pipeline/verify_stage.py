"""The verify stage: a thin adapter from the release's artifacts to :mod:`quantmill.verify`.

It measures the reference and every artifact on the same token ids, applies the recipe's
thresholds (an artifact passes only if every threshold set for it holds; a threshold on a metric
verify did not measure fails), and writes:

* ``verify.json``  the figures and verdicts: deterministic (no timings), so it can be hashed;
* ``timings.json`` tokens per second per artifact (varies run to run; kept apart);
* ``report.md``    the parity table; ``parity.png`` the plot.

Everything verify-specific (function names, metric names) is in this module only.
"""
from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantmill.atomic import write_text_atomic
from quantmill.recipe import Thresholds

if TYPE_CHECKING:
    from quantmill.pipeline.context import StageContext

VERIFY_JSON = "verify.json"
TIMINGS_JSON = "timings.json"
REPORT_MD = "report.md"
PLOT_PNG = "parity.png"
# metric -> the names verify may report it under (first found wins)
METRIC_ALIASES: dict[str, tuple[str, ...]] = {
    "ppl": ("ppl",),
    "ppl_stderr": ("ppl_stderr",),
    "kl_divergence": ("kld_mean", "kl_divergence", "mean_kld", "kld"),
    "top1_agreement": ("top1_agreement", "top1", "same_top1", "top1_match"),
}
# threshold field -> (metric, comparison)
CHECKS: dict[str, tuple[str, str]] = {
    "max_delta_ppl_pct": ("delta_ppl_pct", "<="),
    "max_kl_divergence": ("kl_divergence", "<="),
    "min_top1_agreement": ("top1_agreement", ">="),
}


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def pick_metrics(raw: dict[str, float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for metric, names in METRIC_ALIASES.items():
        found = next((raw[n] for n in names if n in raw), None)
        if found is not None:
            out[metric] = _finite(float(found))
    return out


def verdict(metrics: dict[str, Any], thresholds: Thresholds) -> tuple[bool, list[str]]:
    """(passed, reasons) of one artifact against ``thresholds``."""
    reasons: list[str] = []
    for field, (metric, op) in CHECKS.items():
        limit = getattr(thresholds, field)
        if limit is None:
            continue
        value = metrics.get(metric)
        if value is None:
            reasons.append(f"{metric} not measured (threshold {field}={limit})")
        elif (op == "<=" and value > limit) or (op == ">=" and value < limit):
            reasons.append(f"{metric} {value:.4g} {'>' if op == '<=' else '<'} {limit:g} ({field})")
    return not reasons, reasons


def artifact_paths(ctx: StageContext) -> dict[str, Path]:
    """Artifact name (F16, Q4_K_M, gptq-4bit-128g-actorder_True) -> its file or directory."""
    from quantmill.pipeline.context import gguf_file_name

    found: dict[str, Path] = {}
    for dep in ctx.node.deps:
        node = ctx.plan.node(dep)
        directory = ctx.inputs[dep]
        if node.kind == "gguf-base":
            name = node.params["outtype"].upper()
            found[name] = directory / gguf_file_name(ctx.plan, name)
        elif node.kind == "gguf":
            found[node.params["type"]] = directory / gguf_file_name(ctx.plan, node.params["type"])
        elif node.kind == "gptq":
            for sub in sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")):
                found[sub.name] = sub
    return found


def verify_release(ctx: StageContext) -> None:
    from quantmill.calib_data.bundled import eval_file
    from quantmill.verify.backends.base import BackendOptions
    from quantmill.verify.evaluate import verify_artifacts

    settings = ctx.plan.recipe.recipe.verify
    assert settings is not None
    text = ctx.plan.recipe.input_path(settings.text) or eval_file()
    artifacts = artifact_paths(ctx)
    by_path = {p.resolve(): name for name, p in artifacts.items()}
    result = verify_artifacts(list(artifacts.values()), ctx.model_dir, text, settings.n_ctx,
                              BackendOptions(threads=ctx.threads), max_chunks=settings.max_chunks, progress=ctx.progress)
    records, timings = [], {}
    for item in result.results:
        name = "reference" if item.is_reference else by_path[item.path.resolve()]
        metrics = pick_metrics(item.metrics)
        metrics["delta_ppl_pct"] = _finite(result.delta_ppl_pct(item))
        record: dict[str, Any] = {"name": name, "format": item.format, "size_bytes": item.size_bytes,
                                  "bpw": round(item.bpw, 6), "metrics": metrics, "is_reference": item.is_reference}
        if not item.is_reference:
            passed, reasons = verdict(metrics, settings.overrides.get(name, settings.thresholds))
            if settings.use_default_thresholds:  # verify's own per-quant-type verdict, where it gives one
                reasons += [f"{getattr(item, 'quant_type', '')} default: {f}" for f in getattr(item, "failures", ())]
                passed = not reasons
            record |= {"passed": passed, "reasons": reasons}
        records.append(record)
        timings[name] = {"tokens_per_second": _finite(round(item.tokens_per_second, 3)), "seconds": round(item.seconds, 3)}
    devices = {d: ("measured" if d == "cpu" else _cuda_status()) for d in settings.devices}
    report = {
        "text": Path(text).name if ctx.plan.recipe.input_path(settings.text) else f"bundled:{Path(text).name}",
        "n_ctx": result.n_ctx, "n_chunks": result.n_chunks, "n_tokens": result.n_tokens,
        "token_sha256": result.token_sha256, "devices": devices, "threads": ctx.threads,
        "thresholds": settings.thresholds.model_dump(), "overrides": {k: v.model_dump() for k, v in settings.overrides.items()},
        "artifacts": records,
        "passed": all(r.get("passed", True) for r in records),
    }
    write_text_atomic(ctx.out / VERIFY_JSON, json.dumps(report, indent=2, sort_keys=True) + "\n")
    write_text_atomic(ctx.out / TIMINGS_JSON, json.dumps(timings, indent=2, sort_keys=True) + "\n")
    write_text_atomic(ctx.out / REPORT_MD, parity_markdown(report) + "\n")
    write_plot = getattr(importlib.import_module("quantmill.verify.report"), "write_plot", None)
    if write_plot is not None:  # verify's own plot, where it has one
        write_plot(result, ctx.out / PLOT_PNG)
    else:
        write_parity_plot(report, ctx.out / PLOT_PNG)


def _cuda_status() -> str:
    import torch

    return "not measured: CUDA evaluation is not wired into releases yet" if torch.cuda.is_available() else "skipped: no CUDA device"


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def parity_markdown(report: dict[str, Any]) -> str:
    """The parity table of a ``verify.json``: reference first, then every artifact with its verdict."""
    lines = [
        (f"Measured on {report['text']}: {report['n_chunks']} chunks of {report['n_ctx']} tokens "
         f"(token sha256 {report['token_sha256'][:12]}), CPU, {report['threads']} threads."),
        "",
        "| Artifact | Format | Size MiB | bpw | Perplexity | Δppl % | KL div | Top-1 | Verdict |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for art in report["artifacts"]:
        m = art["metrics"]
        ppl = f"{_fmt(m.get('ppl'), '.4f')} ± {_fmt(m.get('ppl_stderr'), '.4f')}"
        verdict_text = "reference" if art["is_reference"] else ("pass" if art["passed"] else "FAIL: " + "; ".join(art["reasons"]))
        lines.append(
            f"| {art['name']} | {art['format']} | {art['size_bytes'] / 2**20:.2f} | {art['bpw']:.3f} | {ppl} "
            f"| {_fmt(m.get('delta_ppl_pct'), '+.3f')} | {_fmt(m.get('kl_divergence'), '.5f')} "
            f"| {_fmt(m.get('top1_agreement'), '.4f')} | {verdict_text} |"
        )
    return "\n".join(lines)


def write_parity_plot(report: dict[str, Any], path: Path) -> None:
    """Δppl % against bits per weight, one labelled point per artifact (PNG, no timestamps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from quantmill.atomic import atomic_file

    points = [(a["bpw"], a["metrics"].get("delta_ppl_pct"), a["name"], a.get("passed", True))
              for a in report["artifacts"] if not a["is_reference"] and a["metrics"].get("delta_ppl_pct") is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for bpw, delta, name, passed in points:
        ax.scatter([bpw], [delta], color="tab:blue" if passed else "tab:red")
        ax.annotate(name, (bpw, delta), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("bits per weight")
    ax.set_ylabel("perplexity vs fp16 reference (%)")
    ax.set_title("Parity with the reference (red: failed its threshold)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
