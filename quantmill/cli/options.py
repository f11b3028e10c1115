"""Options that several commands share, defined once."""
from __future__ import annotations

from pathlib import Path

import click

checkpoint_dir_option = click.option(
    "--checkpoint-dir", type=click.Path(path_type=Path), default=None,
    help="keep a checkpoint after every decoder layer in this directory: the same command started again with the same "
         "directory after a kill resumes at the first unfinished layer, with the same output bytes (removed when done)")


def size_callback(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    from quantmill.convert.safetensors_io import parse_size

    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


max_memory_option = click.option(
    "--max-memory", callback=size_callback, default=None, metavar="SIZE",
    help="peak resident memory the layer-by-layer passes must stay under (e.g. 20GB, 500MiB; run: over the recipe's "
         "resources.memory): above it their activation streams are spilled to disk; refused before any work when even "
         "that does not fit. Outputs are the same bytes")


device_option = click.option(
    "--device", default="cpu", show_default=True, metavar="cpu|cuda|auto",
    help="where the torch work runs: cpu, cuda (cuda:N) or auto (CUDA when torch sees a GPU, else the CPU); the same "
         "code on both, Hessians in float32")
