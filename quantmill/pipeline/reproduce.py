"""``quantmill reproduce manifest.json``: run a manifest's recipe again and compare, file by file.

The recipe stored in the manifest (paths absolute, thread count and seeds included) is written to
``WORK/release.yaml`` and run in the fresh work directory ``WORK``; then every input and output
sha256 of the new manifest is compared with the old one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from quantmill.errors import QuantmillError, UserInputError
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


def reproduce(manifest_path: Path, work_dir: Path, *, progress: bool = False) -> ReproduceReport:
    from quantmill.pipeline.runner import run_recipe
    from quantmill.recipe_load import load_recipe

    old = read_manifest(Path(manifest_path))
    work_dir = Path(work_dir).resolve()
    if work_dir.exists() and any(p.name != RECIPE_NAME for p in work_dir.iterdir()):
        raise UserInputError(f"--work-dir {work_dir}: not empty; reproduce needs a fresh work directory")
    recipe = {**old["recipe"], "work_dir": "."}
    work_dir.mkdir(parents=True, exist_ok=True)
    recipe_path = work_dir / RECIPE_NAME
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=True), encoding="utf-8")
    loaded = load_recipe(recipe_path)
    run_recipe(loaded, progress=progress, publish=False)
    new = json.loads((loaded.output_dir / MANIFEST).read_text(encoding="utf-8"))
    return ReproduceReport(work_dir, compare_files(old["inputs"], new["inputs"]),
                           compare_files(old["outputs"], new["outputs"]))
