"""``quantmill bake``: a thin click command over quantmill.convert.bake."""
from __future__ import annotations

from pathlib import Path

import click

from quantmill.errors import UserInputError

# Kept in step with quantmill.convert.rope's registry (a test checks it); listed here so
# `quantmill --help` does not import the library.
ROPE_CHOICES = ("dynamic", "linear", "llama3", "ntk-yarn", "yarn")


def _parse_params(values: tuple[str, ...]) -> dict[str, float]:
    params: dict[str, float] = {}
    for item in values:
        key, sep, text = item.partition("=")
        try:
            if not sep:
                raise ValueError
            params[key.strip()] = float(text)
        except ValueError:
            raise UserInputError(f"--rope-param {item!r}: expected KEY=NUMBER, e.g. high_freq_factor=4") from None
    return params


@click.command("bake")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--rope", "method", required=True, metavar="{" + ",".join(ROPE_CHOICES) + "}", help="RoPE scaling method to bake in.")
@click.option("--rope-factor", "factor", required=True, metavar="S", help="Context extension factor.")
@click.option("--original-context", type=int, default=None, metavar="N",
              help="Context the model was trained on (default: its max_position_embeddings).")
@click.option("--rope-param", "rope_params", multiple=True, metavar="KEY=VALUE",
              help="Method parameter (llama3: low_freq_factor, high_freq_factor).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Output directory (written atomically).")
def bake(model: Path, method: str, factor: str, original_context: int | None, rope_params: tuple[str, ...], out_dir: Path) -> None:
    """Copy the Hugging Face checkpoint MODEL with RoPE scaling baked into its config.json."""
    from quantmill.convert.bake import bake_rope

    click.echo(str(bake_rope(model, method, factor, out_dir, original_context, params=_parse_params(rope_params))))
