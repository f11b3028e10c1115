"""Shared by the verify tests (CPU and GPU): the tiny GGUF / HF pair and an evaluation text."""
from __future__ import annotations

import dataclasses
import inspect
import string
from pathlib import Path

from tiny_gguf import bpe_vocab, write_tiny_gguf

from quantmill.verify.backends.base import BackendOptions

N_CTX = 64
OPTIONS = BackendOptions(threads=2)


def eval_text() -> str:
    # not the vocabulary's training text (textwrap + json.decoder)
    return inspect.getsource(string)[:2500] + inspect.getsource(dataclasses)[:2500]


def write_eval_text(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "eval.txt"
    path.write_text(eval_text(), encoding="utf-8")
    return path


def model_pair(root: Path, add_bos: bool) -> tuple[Path, Path]:
    """A tiny f32 GGUF and the HF checkpoint the project's GGUF→HF converter makes of it (float32)."""
    from quantmill.convert.gguf_to_hf import gguf_to_hf

    vocab = dataclasses.replace(bpe_vocab(), add_bos=add_bos)
    gguf_path = root / "tiny-F32.gguf"
    write_tiny_gguf(gguf_path, vocab, tied=False, seed=3)
    reference = root / "reference"
    gguf_to_hf(gguf_path, reference, dtype="float32", progress=False)
    return gguf_path, reference
