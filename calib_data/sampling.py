"""Seeded sampling of calibration sequences, and the sha256 that names them.

The documents are tokenized (no special tokens), joined into one stream with a
blank-line separator, cut into disjoint windows of ``seqlen`` tokens, and ``samples``
of those windows are drawn without replacement by a seeded numpy PCG64 generator,
then kept in corpus order. The same text, tokenizer, sizes and seed give the same
token ids on every machine, and ``token_sha256`` (sha256 of the ids as int32
little-endian bytes, row after row) is what every artifact made from them records.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantmill.calib_data.loaders import CalibrationText
from quantmill.errors import InputFileError, UserInputError
from quantmill.jsonio import read_json_object

DOCUMENT_SEPARATOR = "\n\n"
TOKENIZER_FILE = "tokenizer.json"

Tokenize = Callable[[str], list[int]]


@dataclass(frozen=True)
class CalibrationSet:
    """``samples`` sequences of ``seqlen`` token ids (int32), where they came from and their hash."""

    token_ids: np.ndarray
    source: str
    seed: int
    sha256: str
    corpus_tokens: int

    @property
    def samples(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def seqlen(self) -> int:
        return int(self.token_ids.shape[1])

    def record(self) -> dict[str, Any]:
        """What a manifest or an artifact's metadata stores about these sequences."""
        return {
            "source": self.source,
            "samples": self.samples,
            "seqlen": self.seqlen,
            "seed": self.seed,
            "token_sha256": self.sha256,
            "corpus_tokens": self.corpus_tokens,
        }


def token_sha256(token_ids: np.ndarray) -> str:
    """sha256 of token ids as int32 little-endian bytes, in row-major order."""
    ids = np.asarray(token_ids)
    if ids.size and (ids.min() < np.iinfo(np.int32).min or ids.max() > np.iinfo(np.int32).max):
        raise ValueError("token ids do not fit in int32")
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i4").tobytes()).hexdigest()


def load_tokenize(model_dir: Path) -> Tokenize:
    """The model's tokenizer (``tokenizer.json``, else from ``tokenizer.model``) as a function text -> ids, without special tokens."""
    from quantmill.convert.fast_tokenizer import load_fast_tokenizer

    tokenizer = load_fast_tokenizer(Path(model_dir))

    def tokenize(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    return tokenize


def tokenize_stream(text: CalibrationText, tokenize: Tokenize) -> np.ndarray:
    """All documents as one int32 token stream, separated by the tokens of a blank line."""
    separator = tokenize(DOCUMENT_SEPARATOR)
    pieces: list[list[int]] = []
    for i, doc in enumerate(text.documents):
        if i:
            pieces.append(separator)
        pieces.append(tokenize(doc))
    total = sum(len(p) for p in pieces)
    stream = np.empty(total, dtype=np.int32)
    pos = 0
    for piece in pieces:
        stream[pos : pos + len(piece)] = piece
        pos += len(piece)
    return stream


def check_sizes(samples: int, seqlen: int) -> None:
    if samples < 1:
        raise UserInputError(f"--calib-samples {samples}: must be at least 1")
    if seqlen < 2:
        raise UserInputError(f"--calib-seqlen {seqlen}: must be at least 2")


def sample_from_stream(stream: np.ndarray, source: str, samples: int, seqlen: int, seed: int) -> CalibrationSet:
    """Draw ``samples`` disjoint ``seqlen``-token windows from ``stream`` with a seeded generator."""
    check_sizes(samples, seqlen)
    n_windows = len(stream) // seqlen
    if n_windows < samples:
        raise UserInputError(
            f"{source}: calibration text has {len(stream):,} tokens, enough for {n_windows} sequences of {seqlen}"
            f" but {samples} were requested ({samples * seqlen:,} tokens); use a longer text, fewer"
            " --calib-samples or a shorter --calib-seqlen"
        )
    rng = np.random.Generator(np.random.PCG64(seed))
    chosen = np.sort(rng.choice(n_windows, size=samples, replace=False))
    windows = stream[: n_windows * seqlen].reshape(n_windows, seqlen)
    ids = np.ascontiguousarray(windows[chosen], dtype=np.int32)
    return CalibrationSet(ids, source, seed, token_sha256(ids), int(len(stream)))


def sample_sequences(text: CalibrationText, tokenize: Tokenize, samples: int, seqlen: int, seed: int) -> CalibrationSet:
    """Tokenize ``text`` and draw the seeded calibration sequences from it."""
    check_sizes(samples, seqlen)
    return sample_from_stream(tokenize_stream(text, tokenize), text.name, samples, seqlen, seed)


def save_calibration_set(calib: CalibrationSet, path: Path) -> None:
    """Store ids (``.npy``) plus their record (``.json``) atomically, for stages that reuse them."""
    from quantmill.atomic import atomic_file, write_text_atomic

    path = Path(path)
    with atomic_file(path.with_suffix(".npy")) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, calib.token_ids, allow_pickle=False)
    write_text_atomic(path.with_suffix(".json"), json.dumps(calib.record(), indent=2, sort_keys=True) + "\n")


def load_calibration_set(path: Path) -> CalibrationSet:
    """Read what ``save_calibration_set`` wrote, re-checking the hash."""
    path = Path(path)
    record = read_json_object(path.with_suffix(".json"), "re-run calibration")
    try:
        ids = np.load(path.with_suffix(".npy"), allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputFileError(path, f"cannot read the stored calibration sequences ({exc})", "re-run calibration") from exc
    if ids.ndim != 2 or token_sha256(ids) != record.get("token_sha256"):
        raise InputFileError(path, "stored token ids do not match their recorded sha256", "re-run calibration")
    return CalibrationSet(ids.astype(np.int32), record["source"], int(record["seed"]), record["token_sha256"], int(record["corpus_tokens"]))
