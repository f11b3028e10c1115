"""The release stage: artifacts (hard links), verify report, model cards and manifest, in one directory.

Layout of a release directory::

    gguf/<name>-<TYPE>.gguf, gguf/README.md, gguf/parity.png
    gptq/<branch>/{*.safetensors, config.json, quantize_config.json, ..., README.md, parity.png}
    verify/{verify.json, report.md, parity.png}
    manifest.json

The cards written here assume the Hub layout (the main GPTQ variant on ``main`` of its own repo);
publishing re-renders them for the target's layout with :func:`render_cards`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantmill.atomic import write_text_atomic
from quantmill.card import (
    GGUF_DIR,
    GPTQ_DIR,
    PLOT,
    README,
    CardSettings,
    gguf_card,
    gptq_card,
    model_record,
    read_gguf_file,
    read_gptq_branch,
)
from quantmill.manifest import MANIFEST, build_manifest, file_records

if TYPE_CHECKING:
    from quantmill.pipeline.context import StageContext

VERIFY_DIR = "verify"


def main_branch(manifest_recipe: dict[str, Any]) -> str | None:
    """Release name of the GPTQ variant marked main (the first when none is)."""
    from quantmill.recipe import GptqBranch

    gptq = manifest_recipe.get("gptq")
    if not gptq:
        return None
    branches = [GptqBranch.model_validate(b) for b in gptq["branches"]]
    chosen = next((b for b in branches if b.main), branches[0])
    return chosen.spec().release_name


def gptq_branch_dirs(release_dir: Path) -> list[Path]:
    root = release_dir / GPTQ_DIR
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def gguf_files(release_dir: Path) -> list[Path]:
    root = release_dir / GGUF_DIR
    return sorted(root.glob("*.gguf"), key=lambda p: (-p.stat().st_size, p.name)) if root.is_dir() else []


def render_cards(release_dir: Path, manifest: dict[str, Any], *, gptq_repo: str, gguf_repo: str,
                 published: dict[str, str]) -> dict[str, str]:
    """Card texts by path relative to the release directory, for a layout given by ``published``."""
    settings = CardSettings.from_recipe(manifest["recipe"], manifest["name"])
    report = manifest.get("verification")
    cards: dict[str, str] = {}
    files = [read_gguf_file(p, manifest["model"], report) for p in gguf_files(release_dir)]
    if files:
        cards[f"{GGUF_DIR}/{README}"] = gguf_card(settings, files, report, gguf_repo)
    branches = [read_gptq_branch(p) for p in gptq_branch_dirs(release_dir)]
    for branch in branches:
        cards[f"{GPTQ_DIR}/{branch.name}/{README}"] = gptq_card(settings, branches, published, report, gptq_repo,
                                                                published[branch.name])
    return cards


def hub_layout(manifest: dict[str, Any], release_dir: Path) -> dict[str, str]:
    """Release name -> branch, with the main variant on ``main`` (a repository of its own)."""
    main = main_branch(manifest["recipe"])
    return {p.name: ("main" if p.name == main else p.name) for p in gptq_branch_dirs(release_dir)}


def default_repo(manifest: dict[str, Any], kind: str) -> str:
    settings = CardSettings.from_recipe(manifest["recipe"], manifest["name"])
    return f"{settings.quantized_by}/{settings.name}-{kind}"


def _link_tree(src: Path, dst: Path) -> None:
    from quantmill.pipeline.context import link_or_copy

    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src)
        if not any(part.startswith(".") for part in rel.parts):
            link_or_copy(path, dst / rel)


def _inputs(ctx: StageContext) -> dict[str, str]:
    from quantmill.calib_data.bundled import calibration_files, eval_file
    from quantmill.pipeline.plan import model_files, sha256_file
    from quantmill.pipeline.snapshots import adapter_dir

    loaded, plan = ctx.plan.recipe, ctx.plan
    inputs = {f"source/{name}": sha for name, sha in plan.source_files.items()}
    for i, adapter in enumerate(loaded.recipe.adapters):
        for path in model_files(adapter_dir(loaded, adapter)):
            inputs[f"adapters/{i}/{path.name}"] = sha256_file(path)
    uses = [("calibration", loaded.recipe.calibration.corpus, calibration_files())] if "calibrate" in ctx.inputs else []
    if loaded.recipe.verify is not None:
        uses.append(("verify", loaded.recipe.verify.text, [eval_file()]))
    for role, value, bundled in uses:
        path = loaded.input_path(value)
        for file in [path] if path is not None else (bundled if value == "bundled" else []):
            inputs[f"{role}/{file.name}"] = sha256_file(file)
    return dict(sorted(inputs.items()))


def assemble_release(ctx: StageContext) -> None:
    out = ctx.out
    report: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    for dep in ctx.node.deps:
        node, directory = ctx.plan.node(dep), ctx.inputs[dep]
        if node.kind in ("gguf-base", "gguf"):
            _link_tree(directory, out / GGUF_DIR)
        elif node.kind == "gptq":
            _link_tree(directory, out / GPTQ_DIR)
        elif node.kind == "verify":
            for name in ("verify.json", "report.md", PLOT):
                _link_tree_file(directory / name, out / VERIFY_DIR / name)
            report = json.loads((directory / "verify.json").read_text(encoding="utf-8"))
        elif node.kind == "calibrate":
            calibration = json.loads((directory / "calibration.json").read_text(encoding="utf-8"))
    recipe = ctx.node.params["recipe"]
    config = json.loads((ctx.model_dir / "config.json").read_text(encoding="utf-8"))
    stages = {n.name: n.key for n in ctx.plan.nodes if n.name != ctx.node.name}
    draft = build_manifest(name=ctx.plan.release_name, recipe=recipe, inputs=_inputs(ctx), outputs={}, stages=stages,
                           calibration=calibration, verification=report, threads=ctx.threads,
                           model=model_record(config))
    cards = render_cards(out, draft, gptq_repo=default_repo(draft, "GPTQ"), gguf_repo=default_repo(draft, "GGUF"),
                         published=hub_layout(draft, out))
    for rel, text in cards.items():
        write_text_atomic(out / rel, text)
        if report is not None:
            _link_tree_file(out / VERIFY_DIR / PLOT, (out / rel).parent / PLOT)
    manifest = {**draft, "outputs": file_records(out)}
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _link_tree_file(src: Path, dst: Path) -> None:
    from quantmill.pipeline.context import link_or_copy

    if src.is_file():
        link_or_copy(src, dst)
