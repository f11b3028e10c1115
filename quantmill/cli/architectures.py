"""``quantmill architectures``: the architecture registry as a markdown table."""
from __future__ import annotations

import click


@click.command("architectures")
def architectures() -> None:
    """The model families quantmill knows (one record each) and the stages each can go through."""
    from quantmill.convert.arch import families
    from quantmill.convert.arch.base import CAPABILITIES

    header = ["family", "model_type values", *CAPABILITIES]
    click.echo("| " + " | ".join(header) + " |")
    click.echo("|" + "---|" * len(header))
    for arch in families():
        marks = ["yes" if arch.supports(c) else "-" for c in CAPABILITIES]
        click.echo(f"| {arch.name} | {', '.join(arch.model_types)} | " + " | ".join(marks) + " |")
