"""Refuse, before any work, a recipe whose model cannot go through one of its stages.

The model's architecture record (``quantmill.convert.arch``) says which capabilities its family
has; each stage kind of the plan needs some (its record's ``needs``). The model's config.json is read
as data from where the source stage will take it (the recipe's directory, the local Hugging Face
cache, the bundled model's known family), before the source stage runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from quantmill.convert.arch import Architecture, for_config
from quantmill.errors import UnsupportedError
from quantmill.jsonio import read_json_object
from quantmill.pipeline.plan import Plan
from quantmill.pipeline.stages import STAGES
from quantmill.recipe import BundledSource, HubSource, LocalSource

# The bundled default model's config, as far as the registry needs it (SmolLM2 is a llama).
BUNDLED_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}


def source_config(plan: Plan) -> tuple[dict[str, Any], str] | None:
    """(config.json of the recipe's model, where it was read) or None when it is not on this machine yet."""
    loaded = plan.recipe
    source = loaded.recipe.source
    if isinstance(source, BundledSource):
        return dict(BUNDLED_CONFIG), "the bundled SmolLM2-135M-Instruct"
    if isinstance(source, LocalSource):
        path = loaded.resolve(source.path) / "config.json"
    else:
        assert isinstance(source, HubSource)
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source.id, "config.json", revision=source.revision)
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    return read_json_object(path, "fix config.json of the recipe's source"), str(path)


def check_capabilities(plan: Plan) -> Architecture | None:
    """The model's record, after refusing the first stage of ``plan`` its family cannot run (None: not known yet)."""
    found = source_config(plan)
    if found is None:
        return None
    config, where = found
    arch = for_config(config, Path(where))
    for node in plan.nodes:
        for capability in STAGES[node.kind].needs(node.params):
            try:
                arch.require(capability, plan.recipe.path)
            except UnsupportedError as exc:
                raise UnsupportedError(f"{exc}; stage {node.name!r} of the recipe cannot run on this model ({where})") from None
    return arch
