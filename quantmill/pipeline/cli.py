"""``quantmill init``, ``quantmill run`` and ``quantmill reproduce``: thin click commands over the pipeline."""
from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path

import click

from quantmill.errors import OutputError

EXAMPLE_RECIPE = "example.yaml"
DEFAULT_RECIPE = "default.yaml"


def bundled_recipe(name: str) -> str:
    return resources.files("quantmill.recipes").joinpath(name).read_text(encoding="utf-8")


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
    from quantmill.errors import UserInputError
    from quantmill.recipes import example_text, list_examples

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


def _echo_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


@click.command("run")
@click.argument("recipe", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Print the plan (stages, sizes, disk needed, time) and stop.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.option("--no-publish", is_flag=True, help="Build and verify, but do not publish to the recipe's targets.")
@click.option("--force", is_flag=True, help="Accept (and publish) artifacts whose verification failed.")
def run(recipe: Path, dry_run: bool, as_json: bool, no_publish: bool, force: bool) -> None:
    """Build the release RECIPE describes: resumable, a repeated run does nothing."""
    from quantmill.redact import redact
    from quantmill.pipeline.runner import format_plan, run_recipe
    from quantmill.recipe_load import load_recipe

    loaded = load_recipe(recipe)
    report = run_recipe(loaded, dry_run=dry_run, progress=sys.stderr.isatty() and not as_json,
                        publish=not no_publish, force=force)
    if as_json:
        _echo_json(report.as_json())
        return
    if dry_run:
        click.echo(format_plan(report))
        return
    for row in report.stages:
        took = f" ({row['seconds']:.1f} s)" if "seconds" in row else ""
        click.echo(f"{row['status']:<5} {row['stage']}{took}")
    verdict = {None: "not run", True: "passed", False: "FAILED (see verify/report.md)"}[report.verification_passed]
    click.echo(f"release: {report.output_dir} (verification {verdict}); log: {report.work_dir / 'quantmill.log'}")
    for item in report.published:
        click.echo(redact(f"published {item['target']} {item['repo']} {item['branch']}: {item['status']}"))


@click.command("reproduce")
@click.argument("manifest", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--work-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Fresh work directory for the re-run [default: ./reproduce-<recipe sha256>].")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
def reproduce(manifest: Path, work_dir: Path | None, as_json: bool) -> None:
    """Re-run MANIFEST's recipe and report, file by file, whether every sha256 is identical."""
    from quantmill.pipeline.reproduce import NotReproducedError, read_reproducible
    from quantmill.pipeline.reproduce import reproduce as run_reproduce

    if work_dir is None:
        work_dir = Path(f"reproduce-{read_reproducible(manifest)['recipe_sha256'][:12]}")
    report = run_reproduce(manifest, work_dir, progress=sys.stderr.isatty() and not as_json)
    if as_json:
        _echo_json(report.as_json())
    else:
        click.echo("\n".join(report.lines()))
    if not report.identical:
        raise NotReproducedError(f"{manifest}: the re-run in {report.work_dir} differs; see the lines above")
