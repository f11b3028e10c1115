"""``quantmill init``: write a bundled or example recipe to start from."""
from __future__ import annotations

from pathlib import Path

import click

from quantmill.errors import OutputError, UserInputError


@click.command("init")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False), required=False)
@click.option("--default", "default", is_flag=True, help="Write the default release (bundled SmolLM2) instead of the commented example.")
@click.option("--example", "example", metavar="NAME", default=None,
              help="Write the shipped example recipe NAME (see --list) [default PATH: NAME.yaml].")
@click.option("--list", "list_only", is_flag=True, help="List the shipped example recipes and exit.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(path: Path | None, default: bool, example: str | None, list_only: bool, force: bool) -> None:
    """Write a commented example recipe to PATH [default: release.yaml]."""
    from quantmill.atomic import write_text_atomic
    from quantmill.recipes import DEFAULT_RECIPE, EXAMPLE_RECIPE, bundled_recipe, example_text, list_examples

    if list_only:
        rows = list_examples()
        width = max((len(name) for name, _ in rows), default=0)
        for name, description in rows:
            click.echo(f"{name:<{width}}  {description}")
        return
    if example is not None and default:
        raise UserInputError("--example and --default: choose one")
    text = example_text(example) if example is not None else bundled_recipe(DEFAULT_RECIPE if default else EXAMPLE_RECIPE)
    if path is None:
        path = Path(f"{example}.yaml" if example is not None else "release.yaml")
    if path.exists() and not force:
        raise OutputError(f"{path}: already exists; pass --force to overwrite it or choose another name")
    write_text_atomic(path, text)
    click.echo(f"wrote {path}; edit it, then: quantmill run {path} --dry-run")
