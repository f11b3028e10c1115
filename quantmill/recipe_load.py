"""Reading ``release.yaml``: YAML -> :class:`~quantmill.recipe.Recipe`, with one clear error per bad field.

Validation errors become ONE :class:`~quantmill.recipe.RecipeError` line naming the file, the field
(with a "did you mean" for typos), the value and what is allowed; then the paths are checked (inputs
exist, output inside the work directory, the work directory can be created). Nothing is written.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from quantmill.recipe import BUNDLED, LoadedRecipe, LocalSource, Recipe, RecipeError
from quantmill.verify.thresholds import RENAMED


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _walk(loc: tuple[Any, ...]) -> tuple[str, list[str]]:
    """The dotted field path of ``loc`` (without union tags) and the fields allowed at its last step."""
    models: list[type[BaseModel]] = [Recipe]
    parts: list[str] = []
    for i, part in enumerate(loc):
        if isinstance(part, int):
            parts.append(str(part))
            continue
        tagged = [m for m in models if m.model_fields.get("kind") is not None and m.model_fields["kind"].default == part]
        if tagged and i < len(loc) - 1:
            models = tagged
            continue
        parts.append(part)
        if i < len(loc) - 1:
            owner = next((m for m in models if part in m.model_fields), None)
            models = _models_in(owner.model_fields[part].annotation) if owner else models  # else a mapping key
    allowed = sorted(models[0].model_fields) if models else []
    return ".".join(parts) or "(top level)", allowed


def _one_line(path: Path, error: dict[str, Any]) -> str:
    loc = tuple(error.get("loc", ()))
    field, allowed = _walk(loc)
    kind = error.get("type", "")
    value = error.get("input")
    if kind == "extra_forbidden" and RENAMED.get(str(loc[-1])) in allowed:
        return f"{path}: {field}: renamed; write {RENAMED[loc[-1]]!r} instead"
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"{path}: {field}: unknown field; {hint}allowed here: {', '.join(allowed)}"
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if kind == "union_tag_invalid" or kind == "union_tag_not_found":
        return f"{path}: {field}: {message}"
    shown = "" if isinstance(value, (dict, list)) or value is None else f" {value!r}"
    return f"{path}: {field}{shown}: {message}"


def validate_recipe(data: Any, path: Path) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping (name:, source:, gguf: ...); see `quantmill init`")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_one_line(path, dict(exc.errors()[0]))) from None


def load_recipe(path: str | Path) -> LoadedRecipe:
    """Read and validate ``path``; check every input exists and the work directory can be written."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe; write one with `quantmill init {path}`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc}); check the file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise RecipeError(f"{path}: not valid YAML{where} ({problem}); fix the syntax") from None
    loaded = LoadedRecipe(path, validate_recipe(data, path), text)
    check_paths(loaded)
    return loaded


def check_paths(loaded: LoadedRecipe) -> None:
    """Inputs exist; output stays inside the work directory; the work directory can be created."""
    recipe, path = loaded.recipe, loaded.path
    work = loaded.work_dir
    out = loaded.output_dir
    if out == work or work not in out.parents:
        raise RecipeError(f"{path}: output {str(recipe.output)!r} is outside the work directory {work}; "
                          "use a relative path inside it, e.g. release")
    check_release_output(loaded)
    if isinstance(recipe.source, LocalSource):
        src = loaded.resolve(recipe.source.path)
        if not (src / "config.json").is_file():
            raise RecipeError(f"{path}: source.path {str(recipe.source.path)!r}: no config.json in {src}; "
                              "point it at a Hugging Face model directory")
        if src == work or src in work.parents or work in src.parents:
            raise RecipeError(f"{path}: work_dir {work} overlaps source.path {src}; choose a separate work directory")
    for i, adapter in enumerate(recipe.adapters):
        if adapter.path is not None and not loaded.resolve(adapter.path).is_dir():
            raise RecipeError(f"{path}: adapters.{i}.path {str(adapter.path)!r}: no such directory; "
                              "point it at a PEFT adapter folder")
    for field, value in (("calibration.corpus", recipe.calibration.corpus),
                         ("verify.text", recipe.verify.text if recipe.verify else BUNDLED)):
        file = loaded.input_path(value)
        if file is not None and not file.is_file():
            raise RecipeError(f"{path}: {field} {value!r}: no such file; use 'bundled' or a text file")
    if recipe.lckv is not None:
        raise RecipeError(f"{path}: lckv: LCKV layer sharing is read from the source's config.json "
                          "(model_type lckv-llama), not set in a recipe; remove the lckv section")
    _check_creatable(path, "work_dir", work)


def check_release_output(loaded: LoadedRecipe) -> None:
    """``output`` obeys the output rule: new, empty, or an earlier release (manifest.json); never a file,
    a symbolic link, the stages directory or a directory quantmill did not write."""
    from quantmill.errors import OutputError
    from quantmill.manifest import MANIFEST
    from quantmill.outputs import check_output, marker

    work = loaded.work_dir
    try:
        check_output(work / loaded.recipe.output, kind="dir", flag=f"{loaded.path}: output", command="quantmill run",
                     inputs=[work / "stages", work / "quantmill.log"], owned=marker(MANIFEST))
    except OutputError as exc:
        raise RecipeError(str(exc)) from None


def _check_creatable(recipe_path: Path, field: str, directory: Path) -> None:
    """``directory`` exists as a writable directory, or can be created (nothing is created here)."""
    probe = directory
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise RecipeError(f"{recipe_path}: {field} {directory}: {probe} is a file, not a directory; choose another location")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RecipeError(f"{recipe_path}: {field} {directory}: {probe} is not writable; choose a writable location")
