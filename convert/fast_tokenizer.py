"""A checkpoint's tokenizer as a ``tokenizers.Tokenizer``: its ``tokenizer.json``, else one made from ``tokenizer.model``.

Many SentencePiece checkpoints (OpenLLaMA, LongLLaMA) ship only ``tokenizer.model``; transformers
converts it into the same fast tokenizer its own loaders would build (its SentencePiece
converter, no remote code: a tokenizer_config that names custom code is refused).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from quantmill.errors import InputFileError
from quantmill.jsonio import read_json_object

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
DEFAULT_CLASS = "LlamaTokenizer"  # what a tokenizer.model without tokenizer_config.json is, as transformers reads it


def load_fast_tokenizer(model_dir: Path) -> Any:
    """``model_dir``'s tokenizer; InputFileError naming the file when there is none or it cannot be read."""
    from tokenizers import Tokenizer

    model_dir = Path(model_dir)
    path = model_dir / TOKENIZER_JSON
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception subclasses from Rust
            raise InputFileError(path, f"cannot be read as a tokenizer ({exc})", "re-save the tokenizer with transformers") from exc
    if not (model_dir / SENTENCEPIECE_MODEL).is_file():
        raise InputFileError(path, "no tokenizer.json (nor tokenizer.model) next to the model", "save the model with its tokenizer")
    return _from_sentencepiece(model_dir)


def _from_sentencepiece(model_dir: Path) -> Any:
    import transformers
    from transformers.utils import logging as hf_logging

    config_path = model_dir / "tokenizer_config.json"
    config = read_json_object(config_path, "fix tokenizer_config.json") if config_path.is_file() else {}
    if config.get("auto_map"):
        raise InputFileError(config_path, "names custom tokenizer code (auto_map), which quantmill never runs",
                             "add a tokenizer.json made with transformers")
    name = str(config.get("tokenizer_class") or DEFAULT_CLASS)
    # only transformers' own classes, by name (v5 folds the *Fast classes into the plain names)
    cls = getattr(transformers, name, None) or getattr(transformers, name.removesuffix("Fast"), None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise InputFileError(config_path, f"tokenizer_class {name!r} is not a transformers tokenizer",
                             "add a tokenizer.json made with transformers")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = cls.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise InputFileError(model_dir / SENTENCEPIECE_MODEL, f"cannot be turned into a fast tokenizer ({exc})",
                             "add a tokenizer.json made with transformers") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    backend = getattr(tokenizer, "_tokenizer", None) or getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise InputFileError(model_dir / SENTENCEPIECE_MODEL, "transformers made no fast tokenizer of it",
                             "add a tokenizer.json made with transformers")
    return backend
