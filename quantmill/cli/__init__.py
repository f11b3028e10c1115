"""Command-line entry point: one module per command group, registered here by plain imports.

Only this package prints, and ``main`` is the one place that turns a ``QuantmillError`` into a
message on stderr and an exit code. Heavy libraries are imported inside the command bodies.
"""
from __future__ import annotations

import atexit
import gc
import logging
import sys

import click

from quantmill import __version__
from quantmill.cli import architectures, bake, calibrate, convert, default_release, init, merge, quantize, reproduce, run, verify
from quantmill.errors import QuantmillError
from quantmill.outputs import write_error
from quantmill.progress import LOGGER_NAME as PROGRESS_LOGGER
from quantmill.redact import redact

COMMANDS: tuple[click.Command, ...] = (
    architectures.architectures, bake.bake, calibrate.calibrate, convert.convert, default_release.default_release,
    init.init, merge.merge, quantize.quantize, reproduce.reproduce, run.run, verify.verify,
)

atexit.register(gc.freeze)  # the process ends without a last collection of every object (~50 ms with libllama loaded)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, commands=COMMANDS)
@click.version_option(__version__, prog_name="quantmill")
def cli() -> None:
    """quantmill: reproducible model conversion, quantization and verification."""


class _ProgressLines(logging.Handler):
    """The library's progress lines on stderr (resolved at each line, so a replaced stderr is followed)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(redact(f"quantmill: {record.getMessage()}"), err=True)


def show_progress_lines() -> None:
    """When stderr is not a terminal (CI logs, nohup, a Ray worker), long work reports by plain lines, not bars."""
    logger = logging.getLogger(PROGRESS_LOGGER)
    if not sys.stderr.isatty() and not any(isinstance(h, _ProgressLines) for h in logger.handlers):
        logger.addHandler(_ProgressLines(logging.INFO))
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    gc.freeze()  # what the imports made lives as long as the process: collections need not walk it again
    show_progress_lines()
    try:
        cli.main(args=argv, prog_name="quantmill", standalone_mode=False)
    except QuantmillError as exc:
        click.echo(redact(f"quantmill: error: {exc}"), err=True)
        return exc.exit_code
    except OSError as exc:  # a write failure the library did not translate: still one line, exit 2
        error = write_error(exc, exc.filename or "a file", action=exc.strerror or "failed")
        if error is None:
            raise
        click.echo(redact(f"quantmill: error: {error}"), err=True)
        return error.exit_code
    except click.exceptions.Abort:
        click.echo("quantmill: aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return 2
    except KeyboardInterrupt:
        click.echo("quantmill: interrupted", err=True)
        return 130
    return 0
