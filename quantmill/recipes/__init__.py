"""Bundled recipes: ``default.yaml`` (the default release), ``example.yaml`` (what ``quantmill init`` writes)
and ``examples/<name>.yaml``, real releases shipped as examples (``quantmill init --list`` / ``--example NAME``).

An example's one-line description is the first comment line of its file.
"""
from __future__ import annotations

from importlib import resources
from importlib.abc import Traversable

from quantmill.errors import UserInputError

DEFAULT_RECIPE = "default.yaml"
EXAMPLE_RECIPE = "example.yaml"
EXAMPLES_DIR = "examples"
SUFFIX = ".yaml"


def bundled_recipe(name: str) -> str:
    """The YAML text of the bundled recipe ``name`` (:data:`DEFAULT_RECIPE`, :data:`EXAMPLE_RECIPE`)."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def _examples() -> dict[str, Traversable]:
    folder = resources.files(__name__).joinpath(EXAMPLES_DIR)
    if not folder.is_dir():
        return {}
    return {entry.name.removesuffix(SUFFIX): entry for entry in folder.iterdir()
            if entry.is_file() and entry.name.endswith(SUFFIX)}


def example_names() -> list[str]:
    """The names of the shipped example recipes, sorted."""
    return sorted(_examples())


def example_text(name: str) -> str:
    """The YAML text of example ``name``; an unknown name is one :class:`UserInputError` listing the valid ones."""
    found = _examples().get(name)
    if found is None:
        raise UserInputError(f"--example {name!r}: no such example recipe; choose one of {', '.join(example_names())}")
    return found.read_text(encoding="utf-8")


def describe(text: str) -> str:
    """The first comment line of a recipe, without its ``#``: the example's one-line description."""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            return stripped.lstrip("#").strip()
        if stripped:
            break
    return ""


def list_examples() -> list[tuple[str, str]]:
    """(name, one-line description) of every shipped example, sorted by name."""
    return [(name, describe(example_text(name))) for name in example_names()]
