"""``manifest.json``: what a release is made of and from, and the file-by-file comparison of two.

The manifest records the sha256 of every input and output file, the package versions, the seeds
and thread count, the calibration token hash, the recipe (paths absolute) and the verification
results. It holds no timestamps and no timings, so the same recipe on the same inputs gives the
same manifest.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantmill.errors import InputFileError
from quantmill.hashing import sha256_file
from quantmill.jsonio import read_json_object

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
PACKAGES = ("quantmill", "torch", "transformers", "safetensors", "tokenizers", "gguf", "llama_cpp_python", "numpy",
            "pydantic", "huggingface_hub")


def canonical_json(value: Any) -> str:
    """The one JSON text of ``value`` that is hashed: sorted keys, no spaces, ASCII."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def file_records(directory: Path, *, skip: tuple[str, ...] = (MANIFEST,)) -> dict[str, dict[str, Any]]:
    """relative path -> {sha256, size} for every file under ``directory`` (sorted, dotfiles skipped)."""
    records: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel in skip or any(part.startswith(".") for part in Path(rel).parts):
            continue
        records[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return records


def build_manifest(*, name: str, recipe: dict[str, Any], inputs: dict[str, str], outputs: dict[str, dict[str, Any]],
                   stages: dict[str, str], calibration: dict[str, Any] | None, verification: dict[str, Any] | None,
                   threads: int, model: dict[str, Any], mixes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest without its outputs' sha256s; ``mixes`` (budgeted GGUF mixes: how each was chosen) only when there are."""
    return {
        "manifest_version": MANIFEST_VERSION,
        "name": name,
        "model": model,
        "packages": package_versions(),
        "threads": threads,
        "seeds": {"calibration": recipe["calibration"]["seed"]},
        "calibration": calibration,
        "recipe": recipe,
        "recipe_sha256": hashlib.sha256(canonical_json(recipe).encode()).hexdigest(),
        "stages": stages,
        "inputs": inputs,
        "outputs": outputs,
        "verification": verification,
        **({"mixes": dict(sorted(mixes.items()))} if mixes else {}),
    }


def read_manifest(path: Path) -> dict[str, Any]:
    data = read_json_object(path, "pass the manifest.json of a release")
    if data.get("manifest_version") != MANIFEST_VERSION or "outputs" not in data:
        raise InputFileError(path, "is not a quantmill manifest (version 1)", "pass the manifest.json of a release")
    return data


@dataclass(frozen=True)
class FileComparison:
    path: str
    status: str  # identical, different, missing, extra
    expected: str | None
    actual: str | None


def compare_files(expected: dict[str, Any], actual: dict[str, Any]) -> list[FileComparison]:
    """Compare ``{path: sha256 or {sha256: ...}}`` maps file by file, sorted by path."""

    def sha(value: Any) -> str | None:
        return value["sha256"] if isinstance(value, dict) else value

    rows = []
    for path in sorted(set(expected) | set(actual)):
        want, got = sha(expected.get(path)), sha(actual.get(path))
        status = ("missing" if got is None else "extra" if want is None else "identical" if want == got else "different")
        rows.append(FileComparison(path, status, want, got))
    return rows
