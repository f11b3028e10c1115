"""``quantmill reproduce``: re-run a manifest's recipe and compare every sha256, a thin click command."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from quantmill.cli.run import echo_json


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
        echo_json(report.as_json())
    else:
        click.echo("\n".join(report.lines()))
    if not report.identical:
        raise NotReproducedError(f"{manifest}: the re-run in {report.work_dir} differs; see the lines above")
