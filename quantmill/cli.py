"""Command-line entry point: thin click commands over the library.

Commands live next to the stage they drive (``convert/cli.py``, ``quantize/gguf/cli.py``,
``verify/cli.py`` ...) and are listed here as data. This module is the only place that
turns a ``QuantmillError`` into a message on stderr and an exit code.
"""
from __future__ import annotations

import importlib
import sys

import click

from quantmill import __version__
from quantmill.errors import QuantmillError
from quantmill.outputs import write_error
from quantmill.redact import redact

# (group path, module, attribute): every command quantmill has, in one table.
COMMANDS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("convert",), "quantmill.convert.cli", "hf_to_gguf"),
    ((), "quantmill.convert.cli", "architectures"),
    (("convert",), "quantmill.convert.cli_source", "gguf_to_hf"),
    (("quantize",), "quantmill.quantize.gguf.cli", "quantize_gguf"),
    ((), "quantmill.verify.cli", "verify"),
    ((), "quantmill.default_release", "default_release"),
    ((), "quantmill.quantize.stats_cli", "calibrate"),
    ((), "quantmill.convert.merge.cli", "merge"),
    (("convert",), "quantmill.convert.merge.cli", "lora_to_gguf"),
    (("quantize",), "quantmill.quantize.gptq.cli", "quantize_gptq"),
    ((), "quantmill.convert.bake_cli", "bake"),
    ((), "quantmill.pipeline.cli", "init"),
    ((), "quantmill.pipeline.cli", "run"),
    ((), "quantmill.pipeline.cli", "reproduce"),
)

GROUP_HELP = {
    "convert": "Convert checkpoints between Hugging Face safetensors and GGUF.",
    "quantize": "Quantize a model (GGUF through libllama; GPTQ).",
}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="quantmill")
def cli() -> None:
    """quantmill: reproducible model conversion, quantization and verification."""


def _group(path: tuple[str, ...]) -> click.Group:
    group: click.Group = cli
    for name in path:
        sub = group.commands.get(name)
        if sub is None:
            sub = click.Group(name, help=GROUP_HELP.get(name))
            group.add_command(sub)
        assert isinstance(sub, click.Group)
        group = sub
    return group


def _register() -> None:
    for path, module, attr in COMMANDS:
        command = getattr(importlib.import_module(module), attr)
        _group(path).add_command(command)


def main(argv: list[str] | None = None) -> int:
    _register()
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


if __name__ == "__main__":
    sys.exit(main())
