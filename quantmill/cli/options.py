"""Options that several commands share, defined once."""
from __future__ import annotations

from pathlib import Path

import click

checkpoint_dir_option = click.option(
    "--checkpoint-dir", type=click.Path(path_type=Path), default=None,
    help="keep a checkpoint after every decoder layer in this directory: the same command started again with the same "
         "directory after a kill resumes at the first unfinished layer, with the same output bytes (removed when done)")
