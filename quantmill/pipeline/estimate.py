"""Size, disk and time estimates of a plan, from the source model's parameter count.

Sizes follow from the formats (bytes per weight); times from throughputs measured on the 2-core
development machine for SmolLM2-135M (seconds per million parameters, at 2 threads). They are
estimates, shown by ``--dry-run`` and used to refuse a run the disk cannot hold.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from quantmill.pipeline.context import ModelSize
from quantmill.pipeline.plan import Plan
from quantmill.pipeline.stages import STAGES
from quantmill.pipeline.stages.source import model_files
from quantmill.recipe import BundledSource, LocalSource


def _safetensors_size(files: list[Path]) -> ModelSize:
    from quantmill.convert.safetensors_io import tensor_entries

    entries = tensor_entries(f for f in files if f.suffix == ".safetensors")
    embedding = sum(e.n_elements for e in entries if "embed" in e.name or "lm_head" in e.name)
    return ModelSize(sum(e.n_elements for e in entries), embedding, sum(f.stat().st_size for f in files))


def model_size(plan: Plan) -> ModelSize | None:
    """The source model's size, from safetensors headers (or the bundled GGUF); None when unknown."""
    source = plan.recipe.recipe.source
    if isinstance(source, LocalSource):
        return _safetensors_size(model_files(plan.recipe.resolve(source.path)))
    if isinstance(source, BundledSource):
        from quantmill.default_model import bundled_gguf_path, default_cache_dir
        from quantmill.quantize.gguf.inspect import summarize_gguf

        cached = sorted((default_cache_dir() / "reference").glob("smollm2-*/model.safetensors"))
        if cached:  # the fp16 reference, once built: its header is quick to read
            return _safetensors_size(cached[-1:])
        summary = summarize_gguf(bundled_gguf_path())
        n = summary.n_elements
        emb = sum(t.n_elements for t in summary.tensors if t.name.startswith(("token_embd", "output.")))
        return ModelSize(n, emb, 2 * n)
    return None


def free_bytes(directory: Path) -> int:
    probe = directory
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def plan_table(plan: Plan, work_dir: Path) -> list[dict[str, Any]]:
    """One row per stage: name, key, status (done / todo), estimated bytes and seconds (None where unknown)."""
    size = model_size(plan)
    rows = []
    for node in plan.nodes:
        est = None if size is None else STAGES[node.kind].estimate(size, node.params)
        rows.append({"stage": node.name, "kind": node.kind, "key": node.key[:16], "deps": list(node.deps),
                     "status": "done" if node.is_done(work_dir) else "todo",
                     "estimated_bytes": None if est is None else est.bytes,
                     "estimated_seconds": None if est is None else round(est.seconds, 1)})
    return rows


def disk_needed(rows: list[dict[str, Any]]) -> int | None:
    """Bytes the stages still to run will write; None when the model size is unknown."""
    if any(r["estimated_bytes"] is None for r in rows):
        return None
    return sum(r["estimated_bytes"] for r in rows if r["status"] != "done")
