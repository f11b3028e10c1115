"""Hub repositories at a pinned revision, read through huggingface_hub's cache (offline with HF_HUB_OFFLINE=1).

The source stage and Hub adapters (``adapters: [{hub: {id, revision}}]``) both resolve here, so a
Hub adapter is found, hashed into the plan and read exactly as a Hub source is.
"""
from __future__ import annotations

from pathlib import Path

from quantmill.errors import InputFileError
from quantmill.recipe import Adapter, LoadedRecipe

# What a release reads from a snapshot: weights as safetensors only (no pickles), configs, tokenizers.
ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.txt"]
PICKLE_PATTERNS = ["pytorch_model*.bin"]  # only with the source's allow_pickle


def hub_snapshot(repo_id: str, revision: str, allow_pickle: bool = False) -> Path:
    """The local directory of ``repo_id`` at ``revision`` (downloaded unless offline and cached)."""
    try:
        from huggingface_hub import snapshot_download

        patterns = ALLOW_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many types (offline, not found, gated)
        raise InputFileError(f"hub:{repo_id}@{revision}", f"cannot be read ({type(exc).__name__})",
                             "check the id and revision, or download it into the local Hugging Face cache first") from None


def adapter_dir(loaded: LoadedRecipe, adapter: Adapter) -> Path:
    """The PEFT folder of ``adapter``: its ``path`` (relative to the recipe) or its Hub snapshot."""
    if adapter.hub is not None:
        return hub_snapshot(adapter.hub.id, adapter.hub.revision)
    assert adapter.path is not None
    return loaded.resolve(adapter.path)
