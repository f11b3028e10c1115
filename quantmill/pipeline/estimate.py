"""Size, disk and time estimates of a plan, from the source model's parameter count.

Sizes follow from the formats (bytes per weight); times from throughputs measured on the 2-core
development machine for SmolLM2-135M (seconds per million parameters, at 2 threads). They are
estimates, shown by ``--dry-run`` and used to refuse a run the disk cannot hold.
"""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from quantmill.pipeline.context import ModelSize
from quantmill.pipeline.plan import Plan
from quantmill.pipeline.stages import STAGES
from quantmill.pipeline.stages.source import model_files
from quantmill.quantize.cost import ModelShape
from quantmill.recipe import BundledSource, LocalSource


def model_shape(model_dir: Path, entries: dict[str, Any] | None) -> ModelShape | None:
    """The model's shape from its config.json: layer sizes from the safetensors headers when there are weights,
    else from transformers' own decoder layer built on the meta device (no memory, no weights: config.json alone)."""
    from quantmill.convert.arch import for_config
    from quantmill.jsonio import read_json_object
    from quantmill.quantize.cost import ModelShape, intermediate_size, layer_params

    path = model_dir / "config.json"
    if not path.is_file():
        return None
    raw = read_json_object(path, "re-save the model's config")
    arch = for_config(raw, path)
    if arch.decoder is None:
        return None
    config_cls, layer_cls, _ = arch.decoder.classes()
    config = config_cls.from_dict(arch.transformers_config(raw, path))
    n_layers, hidden, vocab = int(config.num_hidden_layers), int(config.hidden_size), int(config.vocab_size)
    if entries:
        per_layer = layer_params(entries, arch.decoder.layer_prefix.format(index=0))
        n_params = sum(int(e.n_elements) for e in entries.values())
    else:
        import torch

        config._attn_implementation = "sdpa"  # as the layer-by-layer runner builds its layers
        with torch.device("meta"):
            per_layer = sum(p.numel() for p in layer_cls(config, layer_idx=0).parameters())
        tied = bool(getattr(config, "tie_word_embeddings", False))
        n_params = n_layers * per_layer + vocab * hidden * (1 if tied else 2) + hidden
    return ModelShape(n_params, n_layers, per_layer, hidden, intermediate_size(config), vocab)


def _checkpoint_size(directory: Path, files: list[Path]) -> ModelSize | None:
    """From the safetensors headers; from config.json alone when there are no weights (a plan for a model not here)."""
    from quantmill.convert.safetensors_io import tensor_entries

    entries = {e.name: e for e in tensor_entries(f for f in files if f.suffix == ".safetensors")}
    shape = model_shape(directory, entries)
    if not entries:
        if shape is None:
            return None
        embedding = shape.n_params - shape.n_layers * shape.layer_params
        return ModelSize(shape.n_params, embedding, 2 * shape.n_params, shape)
    embedding = sum(e.n_elements for e in entries.values() if "embed" in e.name or "lm_head" in e.name)
    return ModelSize(sum(e.n_elements for e in entries.values()), embedding, sum(f.stat().st_size for f in files), shape)


def _source_size(plan: Plan) -> ModelSize | None:
    source = plan.recipe.recipe.source
    if isinstance(source, LocalSource):
        directory = plan.recipe.resolve(source.path)
        return _checkpoint_size(directory, model_files(directory))
    if isinstance(source, BundledSource):
        from quantmill.default_model import bundled_gguf_path, default_cache_dir
        from quantmill.quantize.gguf.inspect import summarize_gguf

        cached = sorted((default_cache_dir() / "reference").glob("smollm2-*/model.safetensors"))
        if cached:  # the fp16 reference, once built: its header is quick to read
            return _checkpoint_size(cached[-1].parent, cached[-1:])
        summary = summarize_gguf(bundled_gguf_path())
        n = summary.n_elements
        emb = sum(t.n_elements for t in summary.tensors if t.name.startswith(("token_embd", "output.")))
        return ModelSize(n, emb, 2 * n)
    return None


def model_size(plan: Plan) -> ModelSize | None:
    """The source model's size and shape (safetensors headers, config.json or the bundled GGUF), with the recipe's
    calibration tokens and memory budget; None when unknown."""
    size = _source_size(plan)
    recipe = plan.recipe.recipe
    return None if size is None else replace(size, samples=recipe.calibration.samples, seqlen=recipe.calibration.seqlen,
                                             max_memory=None if recipe.resources.memory is None else int(recipe.resources.memory))


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
                     "estimated_seconds": None if est is None else round(est.seconds, 1),
                     "estimated_memory": None if est is None else est.memory,
                     "estimated_memory_required": None if est is None else est.required})
    return rows


def disk_needed(rows: list[dict[str, Any]]) -> int | None:
    """Bytes the stages still to run will write; None when the model size is unknown."""
    if any(r["estimated_bytes"] is None for r in rows):
        return None
    return sum(r["estimated_bytes"] for r in rows if r["status"] != "done")
