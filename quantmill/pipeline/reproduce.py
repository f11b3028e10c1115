"""``quantmill reproduce manifest.json``: run a manifest's recipe again and compare, file by file.

The recipe stored in the manifest (paths absolute, thread count and seeds included) is written to
``WORK/release.yaml`` and run in the fresh work directory ``WORK``; then every input and output
sha256 of the new manifest is compared with the old one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from quantmill.atomic import write_text_atomic
from quantmill.errors import InputFileError, QuantmillError, UserInputError
from quantmill.manifest import MANIFEST, FileComparison, compare_files, read_manifest

RECIPE_NAME = "release.yaml"


class NotReproducedError(QuantmillError):
    """Some file's sha256 differs from the manifest's."""

    exit_code = 1


@dataclass(frozen=True)
class ReproduceReport:
    work_dir: Path
    inputs: list[FileComparison]
    outputs: list[FileComparison]

    @property
    def identical(self) -> bool:
        return all(c.status == "identical" for c in (*self.inputs, *self.outputs))

    def as_json(self) -> dict[str, Any]:
        def rows(items: list[FileComparison]) -> list[dict[str, Any]]:
            return [{"path": c.path, "status": c.status, "expected": c.expected, "actual": c.actual} for c in items]

        return {"work_dir": str(self.work_dir), "identical": self.identical, "inputs": rows(self.inputs),
                "outputs": rows(self.outputs)}

    def lines(self) -> list[str]:
        out = []
        for title, items in (("input", self.inputs), ("output", self.outputs)):
            for c in items:
                out.append(f"{c.status:<10} {title:<6} {c.path}  {(c.actual or c.expected or '')[:16]}")
        same = sum(c.status == "identical" for c in (*self.inputs, *self.outputs))
        total = len(self.inputs) + len(self.outputs)
        out.append(f"{same} of {total} files identical: " + ("reproduced" if self.identical else "NOT reproduced"))
        return out


def read_reproducible(manifest_path: Path) -> dict[str, Any]:
    """The manifest, with what reproduce needs checked (recipe, inputs, outputs, recipe sha256), or one error."""
    path = Path(manifest_path)
    old = read_manifest(path)
    for key in ("recipe", "inputs", "outputs"):
        if not isinstance(old.get(key), dict):
            raise InputFileError(path, f"has no {key!r} mapping, so it cannot be reproduced",
                                 "pass the manifest.json of a release as quantmill wrote it")
    sha = old.get("recipe_sha256")
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{12,64}", sha):
        raise InputFileError(path, "has no valid 'recipe_sha256'", "pass the manifest.json of a release as quantmill wrote it")
    return old


def _check_recipe(manifest_path: Path, recipe: dict[str, Any], recipe_path: Path) -> None:
    """Validate the manifest's recipe as it will run, before anything is written; errors name the manifest."""
    from quantmill.recipe import LoadedRecipe, RecipeError
    from quantmill.recipe_load import check_paths, validate_recipe

    where = f"{manifest_path} (its recipe)"
    validated = validate_recipe(recipe, Path(where))
    try:
        check_paths(LoadedRecipe(recipe_path, validated, ""))
    except RecipeError as exc:
        raise RecipeError(str(exc).replace(str(recipe_path), where)) from None


def reproduce(manifest_path: Path, work_dir: Path, *, progress: bool = False) -> ReproduceReport:
    from quantmill.pipeline.runner import run_recipe
    from quantmill.recipe_load import load_recipe

    old = read_reproducible(Path(manifest_path))
    work_dir = Path(work_dir).resolve()
    if work_dir.exists() and not work_dir.is_dir():
        raise UserInputError(f"--work-dir {work_dir}: is a file; give a new directory")
    if work_dir.exists() and any(p.name != RECIPE_NAME for p in work_dir.iterdir()):
        raise UserInputError(f"--work-dir {work_dir}: not empty; reproduce needs a fresh work directory")
    recipe = {**old["recipe"], "work_dir": "."}
    recipe_path = work_dir / RECIPE_NAME
    _check_recipe(Path(manifest_path), recipe, recipe_path)
    work_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(recipe_path, yaml.safe_dump(recipe, sort_keys=True))
    loaded = load_recipe(recipe_path)
    run_recipe(loaded, progress=progress, publish=False)
    new = read_manifest(loaded.output_dir / MANIFEST)
    return ReproduceReport(work_dir, compare_files(old["inputs"], new["inputs"]),
                           compare_files(old["outputs"], new["outputs"]))
