"""``quantmill run``: build the release a recipe describes, a thin click command over the pipeline runner."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click


def echo_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


@click.command("run")
@click.argument("recipe", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Print the plan (stages, sizes, disk needed, time) and stop.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.option("--no-publish", is_flag=True, help="Build and verify, but do not publish to the recipe's targets.")
@click.option("--force", is_flag=True, help="Accept (and publish) artifacts whose verification failed.")
def run(recipe: Path, dry_run: bool, as_json: bool, no_publish: bool, force: bool) -> None:
    """Build the release RECIPE describes: resumable, a repeated run does nothing."""
    from quantmill.pipeline.runner import format_plan, run_recipe
    from quantmill.recipe_load import load_recipe
    from quantmill.redact import redact

    loaded = load_recipe(recipe)
    report = run_recipe(loaded, dry_run=dry_run, progress=sys.stderr.isatty() and not as_json,
                        publish=not no_publish, force=force)
    if as_json:
        echo_json(report.as_json())
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
