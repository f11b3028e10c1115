"""``quantmill run``: build the release a recipe describes, a thin click command over the pipeline runner."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from quantmill.cli.options import max_memory_option
from quantmill.pipeline.executors import DEFAULT, EXECUTORS


def echo_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


@click.command("run")
@click.argument("recipe", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Print the plan (stages, sizes, disk needed, time) and stop.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.option("--no-publish", is_flag=True, help="Build and verify, but do not publish to the recipe's targets.")
@click.option("--force", is_flag=True, help="Accept (and publish) artifacts whose verification failed.")
@click.option("--executor", type=click.Choice(list(EXECUTORS)), default=DEFAULT, show_default=True,
              help="Who runs the stages: this process, or a running Ray cluster (pip install 'quantmill[ray]').")
@click.option("--address", metavar="HOST:PORT", default=None,
              help="The Ray cluster's head (--executor ray); default: the cluster `ray start` runs on this machine.")
@max_memory_option
def run(recipe: Path, dry_run: bool, as_json: bool, no_publish: bool, force: bool, executor: str, address: str | None,
        max_memory: int | None) -> None:
    """Build the release RECIPE describes: resumable, a repeated run does nothing."""
    from quantmill.errors import UserInputError
    from quantmill.pipeline.runner import format_plan, run_recipe
    from quantmill.recipe import Resources
    from quantmill.recipe_load import load_recipe
    from quantmill.redact import redact

    loaded = load_recipe(recipe)
    if max_memory is not None:  # over the recipe's resources.memory; never changes a byte, so never hashed
        loaded.recipe = loaded.recipe.model_copy(update={"resources": Resources(memory=max_memory)})
    report = run_recipe(loaded, dry_run=dry_run, progress=sys.stderr.isatty() and not as_json,
                        publish=not no_publish, force=force, executor=executor, address=address)
    if as_json or dry_run:
        echo_json(report.as_json()) if as_json else click.echo(format_plan(report))
        if report.notes:  # the plan is shown; a run here would be refused (disk, memory): exit 2 as a run would
            raise UserInputError(report.notes[0])
        return
    for row in report.stages:
        took = f" ({row['seconds']:.1f} s)" if "seconds" in row else ""
        click.echo(f"{row['status']:<5} {row['stage']}{took}")
    verdict = {None: "not run", True: "passed", False: "FAILED (see verify/report.md)"}[report.verification_passed]
    click.echo(f"release: {report.output_dir} (verification {verdict}); log: {report.work_dir / 'quantmill.log'}")
    for item in report.published:
        click.echo(redact(f"published {item['target']} {item['repo']} {item['branch']}: {item['status']}"))
