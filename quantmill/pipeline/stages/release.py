"""The release stage: the artifacts (hard links), the verify report, model cards and manifest, in one directory.

Layout of a release directory::

    gguf/<name>-<TYPE>.gguf, gguf/README.md, gguf/parity.png
    gptq/<branch>/{*.safetensors, config.json, quantize_config.json, ..., README.md, parity.png}
    verify/{verify.json, report.md, parity.png}
    manifest.json

Each stage it reads says what it contributes (its record's ``outputs``): files placed in the
release, and JSON files that fill a manifest entry (``calibration``, ``verification``).
"""
from __future__ import annotations

import json
from typing import Any

from quantmill.atomic import write_text_atomic
from quantmill.card import PLOT, model_record
from quantmill.jsonio import read_json_object
from quantmill.manifest import MANIFEST, build_manifest, file_records
from quantmill.pipeline.context import Estimate, StageContext, StageKind, StageParams, link_tree
from quantmill.pipeline.release import default_repo, hub_layout, render_cards
from quantmill.pipeline.stages.verify import PLOT_PNG, VERIFY_DIR
from quantmill.quantize.cost import LIGHT_PROCESS_BYTES


class ReleaseParams(StageParams):
    name: str
    model: str
    recipe: dict[str, Any]  # the recipe as the manifest stores it (paths absolute, no publish targets)
    inputs: dict[str, str]  # role/file name -> sha256 of every input file
    stages: dict[str, str]  # every other stage's name -> key
    threads: int


def run(ctx: StageContext, params: ReleaseParams) -> None:
    out = ctx.out
    entries: dict[str, Any] = {"calibration": None, "verification": None}
    for path, output in ctx.outputs:
        if output.dst is not None:
            link_tree(path, out / output.dst)
        if output.manifest is not None:  # "key" fills a manifest entry, "key/name" one entry of a mapping
            key, _, item = output.manifest.partition("/")
            record = read_json_object(path, "re-run the stage that wrote it")
            if item:
                entries.setdefault(key, {})[item] = record
            else:
                entries[key] = record
    config = read_json_object(ctx.checkpoint(params.model) / "config.json", "re-run the source stage")
    draft = build_manifest(name=params.name, recipe=params.recipe, inputs=params.inputs, outputs={},
                           stages=params.stages, threads=params.threads, model=model_record(config), **entries)
    cards = render_cards(out, draft, gptq_repo=default_repo(draft, "GPTQ"), gguf_repo=default_repo(draft, "GGUF"),
                         published=hub_layout(draft, out))
    for rel, text in cards.items():
        write_text_atomic(out / rel, text)
        if entries["verification"] is not None:
            link_tree(out / VERIFY_DIR / PLOT_PNG, (out / rel).parent / PLOT)
    manifest = {**draft, "outputs": file_records(out)}
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


# cards, manifest, plot: the artifacts are hard links
KIND = StageKind("release", 1, ReleaseParams, run, lambda size, p: Estimate.of(size, 1 << 20, 0.01,
                                                                                         lambda s: LIGHT_PROCESS_BYTES))
