"""Options that several commands share, defined once."""
from __future__ import annotations

from pathlib import Path

import click

checkpoint_dir_option = click.option(
    "--checkpoint-dir", type=click.Path(path_type=Path), default=None,
    help="keep a checkpoint after every decoder layer in this directory: the same command started again with the same "
         "directory after a kill resumes at the first unfinished layer, with the same output bytes (removed when done)")


def size_callback(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    from quantmill.recipe import parse_size

    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


max_memory_option = click.option(
    "--max-memory", callback=size_callback, default=None, metavar="SIZE",
    help="peak resident memory the layer-by-layer passes must stay under (e.g. 20GB, 500MiB; run: over the recipe's "
         "resources.memory): above it their activation streams are spilled to disk; refused before any work when even "
         "that does not fit. Outputs are the same bytes")
