"""A checkpoint's config.json as transformers' config object for its family, as data (no remote code)."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from quantmill.convert.arch import for_config
from quantmill.errors import UnsupportedError

DROPPED_FIELDS = ("quantization_config", "model_type")


def transformers_config(config: Mapping[str, Any], config_path: Path, capability: str = "verify-torch") -> Any:
    """transformers' config for ``config`` (RefinedWeb → Falcon, LongLLaMA → llama), refusing what needs remote code."""
    from transformers import AutoConfig

    arch = for_config(config, config_path)
    arch.require(capability, config_path)
    fields = arch.transformers_config(config, config_path)
    if fields.get("auto_map"):
        raise UnsupportedError(f"{config_path}: the model needs remote code (auto_map); quantmill never runs it")
    try:
        return AutoConfig.for_model(str(fields.get("model_type")), **{k: v for k, v in fields.items() if k not in DROPPED_FIELDS})
    except ValueError as exc:
        raise UnsupportedError(f"{config_path}: {exc}") from exc
