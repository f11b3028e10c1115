"""A release directory's cards and layout: read by the release stage and by publishing.

The cards written by the release stage (:mod:`quantmill.pipeline.stages.release`) assume the Hub
layout (the main GPTQ variant on ``main`` of its own repo); publishing re-renders them for the
target's layout with :func:`render_cards`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from quantmill.card import (
    GGUF_DIR,
    GPTQ_DIR,
    README,
    CardSettings,
    gguf_card,
    gptq_card,
    read_gguf_file,
    read_gptq_branch,
)


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
                                                                published[branch.name], manifest["model"].get("model_type"))
    return cards


def hub_layout(manifest: dict[str, Any], release_dir: Path) -> dict[str, str]:
    """Release name -> branch, with the main variant on ``main`` (a repository of its own)."""
    main = main_branch(manifest["recipe"])
    return {p.name: ("main" if p.name == main else p.name) for p in gptq_branch_dirs(release_dir)}


def default_repo(manifest: dict[str, Any], kind: str) -> str:
    settings = CardSettings.from_recipe(manifest["recipe"], manifest["name"])
    return f"{settings.quantized_by}/{settings.name}-{kind}"
