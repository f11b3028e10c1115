"""Size, disk and time estimates of a plan, from the source model's parameter count.

Sizes follow from the formats (bytes per weight); times from throughputs measured on the 2-core
development machine for SmolLM2-135M (seconds per million parameters, at 2 threads). They are
estimates, shown by ``--dry-run`` and used to refuse a run the disk cannot hold.
"""
from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantmill.pipeline.plan import Node, Plan, model_files
from quantmill.recipe import BundledSource, LocalSource


@dataclass(frozen=True)
class ModelSize:
    n_params: int
    n_embedding: int  # parameters in the embedding and output matrices (kept in float by GPTQ)
    source_bytes: int


@dataclass(frozen=True)
class Estimate:
    bytes: int
    seconds: float


def _safetensors_params(files: list[Path]) -> tuple[int, int]:
    total = embedding = 0
    for path in files:
        if path.suffix != ".safetensors":
            continue
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            n = 1
            for dim in entry["shape"]:
                n *= int(dim)
            total += n
            if "embed" in name or "lm_head" in name:
                embedding += n
    return total, embedding


def model_size(plan: Plan) -> ModelSize | None:
    """The source model's size, from safetensors headers (or the bundled GGUF); None when unknown."""
    source = plan.recipe.recipe.source
    if isinstance(source, LocalSource):
        files = model_files(plan.recipe.resolve(source.path))
        n, emb = _safetensors_params(files)
        return ModelSize(n, emb, sum(f.stat().st_size for f in files))
    if isinstance(source, BundledSource):
        from quantmill.default_model import bundled_gguf_path, default_cache_dir
        from quantmill.quantize.gguf.inspect import summarize_gguf

        cached = sorted((default_cache_dir() / "reference").glob("smollm2-*/model.safetensors"))
        if cached:  # the fp16 reference, once built: its header is quick to read
            n, emb = _safetensors_params(cached[-1:])
            return ModelSize(n, emb, cached[-1].stat().st_size)
        summary = summarize_gguf(bundled_gguf_path())
        n = summary.n_elements
        emb = sum(t.n_elements for t in summary.tensors if t.name.startswith(("token_embd", "output.")))
        return ModelSize(n, emb, 2 * n)
    return None


STAGE_OVERHEAD_SECONDS = 1.0  # loading libraries and files, whatever the model's size
# seconds per million parameters at 2 threads (measured on SmolLM2-135M, see BENCHMARKS.md)
SECONDS_PER_MPARAM = {
    "source": 0.05, "merge": 0.1, "bake": 0.02, "calibrate": 0.02, "imatrix": 0.15, "gptq-branch": 1.6,
    "gguf-base": 0.05, "gguf": 0.1, "verify-artifact": 0.35, "release": 0.01,
}


def _bytes_per_weight(node: Node) -> float:
    from quantmill.quantize.gguf.types import lookup_file_type

    return lookup_file_type(node.params["type"]).nominal_bpw / 8 * 1.15


def _gptq_bytes(size: ModelSize, node: Node) -> int:
    total = 0
    for branch in node.params["branches"]:
        bits = int(branch.split("bit")[0].split("=")[-1])
        total += int((size.n_params - size.n_embedding) * (bits / 8 * 1.1) + size.n_embedding * 2)
    return total


_SIZE: dict[str, Callable[[ModelSize, Node, Plan], int]] = {
    "source": lambda s, n, p: s.source_bytes,
    "merge": lambda s, n, p: s.source_bytes,
    "bake": lambda s, n, p: s.source_bytes,
    "calibrate": lambda s, n, p: int(n.params["samples"]) * int(n.params["seqlen"]) * 4 + 4096,
    "imatrix": lambda s, n, p: s.n_params // 64 + 65536,
    "gptq": lambda s, n, p: _gptq_bytes(s, n),
    "gguf-base": lambda s, n, p: s.n_params * {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 1.07}[n.params["outtype"]],
    "gguf": lambda s, n, p: int(s.n_params * _bytes_per_weight(n)),
    "verify": lambda s, n, p: 1 << 20,
    "release": lambda s, n, p: 1 << 20,  # cards, manifest, plot: the artifacts are hard links
}


def _seconds(size: ModelSize, node: Node) -> float:
    mparams = size.n_params / 1e6
    if node.kind == "gptq":
        per = SECONDS_PER_MPARAM["gptq-branch"] * len(node.params["branches"])
    elif node.kind == "verify":
        per = SECONDS_PER_MPARAM["verify-artifact"] * (len(node.deps))
    else:
        per = SECONDS_PER_MPARAM[node.kind]
    return STAGE_OVERHEAD_SECONDS + per * mparams


def estimate_node(size: ModelSize | None, node: Node, plan: Plan) -> Estimate | None:
    if size is None:
        return None
    return Estimate(int(_SIZE[node.kind](size, node, plan)), _seconds(size, node))


def free_bytes(directory: Path) -> int:
    probe = directory
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def plan_table(plan: Plan, work_dir: Path) -> list[dict[str, Any]]:
    """One row per stage: name, key, done, estimated bytes and seconds (None where unknown)."""
    size = model_size(plan)
    rows = []
    for node in plan.nodes:
        est = estimate_node(size, node, plan)
        done = node.is_done(work_dir)
        rows.append({
            "stage": node.name, "kind": node.kind, "key": node.key[:16], "done": done,
            "deps": list(node.deps),
            "estimated_bytes": None if est is None else est.bytes,
            "estimated_seconds": None if est is None else round(est.seconds, 1),
        })
    return rows


def disk_needed(rows: list[dict[str, Any]]) -> int | None:
    """Bytes the stages still to run will write; None when the model size is unknown."""
    if any(r["estimated_bytes"] is None for r in rows):
        return None
    return sum(r["estimated_bytes"] for r in rows if not r["done"])
