"""Evaluation tokens: read the text, tokenize it once with the reference tokenizer, cut chunks.

The chunking is llama-perplexity's: the token stream (with BOS in front when the vocabulary
adds one) is cut into ``len // n_ctx`` chunks of ``n_ctx`` tokens, the rest is dropped; each
chunk starts a fresh context whose first token is replaced by BOS when the vocabulary adds
BOS; the logits at positions ``n_ctx//2 … n_ctx-2`` are scored against the next token, so a
chunk scores ``n_ctx - n_ctx//2 - 1`` tokens, each with at least ``n_ctx//2`` tokens of context.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from quantmill.errors import InputFileError, UserInputError
from quantmill.jsonio import read_json

if TYPE_CHECKING:
    from tokenizers import Tokenizer

MIN_N_CTX = 8
_PROBE = "Hello world"


@dataclass(frozen=True)
class ReferenceTokenizer:
    """The reference checkpoint's tokenizer and whether/which BOS it puts in front."""

    path: Path
    tokenizer: Tokenizer
    bos_id: int | None

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(int(token_id))


def load_reference_tokenizer(reference_dir: str | Path) -> ReferenceTokenizer:
    """``REF_DIR/tokenizer.json`` (else one made from tokenizer.model) with the BOS policy of ``tokenizer_config.json``."""
    reference_dir = Path(reference_dir)
    if not reference_dir.is_dir():
        raise InputFileError(reference_dir, "no such directory", "pass --reference the fp16 reference checkpoint directory")
    from quantmill.convert.fast_tokenizer import load_fast_tokenizer

    path = reference_dir / "tokenizer.json"
    tokenizer = load_fast_tokenizer(reference_dir)
    return ReferenceTokenizer(path, tokenizer, _bos_id(reference_dir, tokenizer))


def _bos_id(reference_dir: Path, tokenizer: Tokenizer) -> int | None:
    config = _read_json(reference_dir / "tokenizer_config.json")
    if "add_bos_token" in config:
        if not config["add_bos_token"]:
            return None
        bos = config.get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        bos_id = tokenizer.token_to_id(bos) if isinstance(bos, str) else None
        if bos_id is None:
            raise InputFileError(
                reference_dir / "tokenizer_config.json",
                f"add_bos_token is true but bos_token {bos!r} is not in tokenizer.json",
                "fix bos_token or set add_bos_token to false",
            )
        return int(bos_id)
    # No explicit setting: whatever the post-processor puts in front of the text.
    plain = tokenizer.encode(_PROBE, add_special_tokens=False).ids
    special = tokenizer.encode(_PROBE, add_special_tokens=True).ids
    if len(special) > len(plain) and special[1 : 1 + len(plain)] == plain:
        return int(special[0])
    return None


def _read_json(path: Path) -> dict[str, Any]:
    data = read_json(path, "re-create the file") if path.is_file() else {}
    return data if isinstance(data, dict) else {}


def read_eval_text(path: str | Path) -> str:
    """The text of ``path`` (UTF-8), minus one trailing newline as llama.cpp's ``-f`` drops it."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "no such file", "pass --text a UTF-8 text file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputFileError(path, f"cannot be read ({exc.strerror})", "check its permissions") from exc
    if not raw.strip():
        raise InputFileError(path, "is empty", "pass --text a file with enough text for two chunks")
    if b"\x00" in raw:
        raise InputFileError(path, "looks binary (contains NUL bytes)", "pass --text a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputFileError(
            path, f"is not UTF-8 text (bad byte at offset {exc.start})", "pass --text a UTF-8 text file"
        ) from exc
    return text[:-1] if text.endswith("\n") else text


def tokenize_text(text: str, tokenizer: ReferenceTokenizer) -> np.ndarray:
    """Token ids (int32) as llama.cpp's ``common_tokenize(text, add_special=true)`` gives them."""
    ids = tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
    if tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id, *ids]
    return np.asarray(ids, dtype=np.int32)


# An artifact whose own tokenizer splits the evaluation text differently from the reference's by more than
# this fraction of tokens fails: its figures (scored on the reference's ids) are not what its own runtime
# would measure. (A 0.25 % token difference moved SmolLM2's perplexity by about 1 %.)
MAX_TOKENIZATION_DIFFERENCE = 0.0005


@dataclass(frozen=True)
class TokenizationCheck:
    """The reference's token ids of the evaluation text against an artifact's own tokenizer's."""

    reference_tokens: int
    artifact_tokens: int
    first_difference: int | None  # index of the first differing id; None: identical

    @property
    def identical(self) -> bool:
        return self.first_difference is None

    @property
    def difference(self) -> float:
        """Tokens changed, as a fraction of the reference's: ids differing after the common prefix and suffix."""
        if self.first_difference is None:
            return 0.0
        return self.changed / max(1, self.reference_tokens)

    changed: int = 0

    def failure(self) -> str | None:
        if self.difference <= MAX_TOKENIZATION_DIFFERENCE:
            return None
        return (f"its own tokenizer splits the evaluation text differently ({self.artifact_tokens} vs the reference's "
                f"{self.reference_tokens} tokens, {100 * self.difference:.2f} % changed from token {self.first_difference}): "
                "its figures on the reference's ids are not what its runtime measures; fix the tokenizer it was made with")

    def as_json(self) -> dict[str, object]:
        return {"reference_tokens": self.reference_tokens, "artifact_tokens": self.artifact_tokens,
                "first_difference": self.first_difference, "changed_tokens": self.changed, "identical": self.identical}


def compare_tokenizations(reference: np.ndarray, artifact: np.ndarray) -> TokenizationCheck:
    """Where two tokenizations of one text part, and how many ids lie between their common prefix and suffix."""
    ref, own = np.asarray(reference, dtype=np.int64), np.asarray(artifact, dtype=np.int64)
    common = min(ref.size, own.size)
    mismatch = np.flatnonzero(ref[:common] != own[:common])
    if not mismatch.size and ref.size == own.size:
        return TokenizationCheck(int(ref.size), int(own.size), None)
    start = int(mismatch[0]) if mismatch.size else common
    tail = np.flatnonzero(ref[::-1][: common - start] != own[::-1][: common - start])
    suffix = int(tail[0]) if tail.size else common - start
    changed = max(ref.size, own.size) - start - suffix
    return TokenizationCheck(int(ref.size), int(own.size), start, changed=int(changed))


def token_sha256(tokens: np.ndarray) -> str:
    """sha256 of the token ids as little-endian int32: names the exact evaluation input."""
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype="<i4").tobytes()).hexdigest()


@dataclass(frozen=True)
class ChunkPlan:
    """The evaluation's token stream cut into chunks; every backend reads its inputs here."""

    source: Path
    tokens: np.ndarray
    n_ctx: int
    n_chunks: int
    bos_id: int | None

    @property
    def first(self) -> int:
        """First scored logit position of a chunk."""
        return self.n_ctx // 2

    @property
    def n_scored(self) -> int:
        """Tokens scored per chunk (positions first … n_ctx-2 predicting the next token)."""
        return self.n_ctx - self.first - 1

    @property
    def n_evaluated(self) -> int:
        """Tokens a backend runs through the model."""
        return self.n_ctx * self.n_chunks

    @property
    def sha256(self) -> str:
        """sha256 of the token ids evaluated (the chunks, not the dropped remainder)."""
        return token_sha256(self.tokens[: self.n_evaluated])

    def chunk_input(self, index: int) -> np.ndarray:
        """The ``n_ctx`` token ids fed to the model for chunk ``index`` (BOS in front if added)."""
        start = index * self.n_ctx
        ids = self.tokens[start : start + self.n_ctx].copy()
        if self.bos_id is not None:
            ids[0] = self.bos_id
        return ids

    def chunk_targets(self, index: int) -> np.ndarray:
        """The tokens the scored positions of chunk ``index`` must predict."""
        start = index * self.n_ctx
        return self.tokens[start + self.first + 1 : start + self.n_ctx].copy()

    def groups(self, chunks_per_group: int) -> Iterator[list[int]]:
        """Chunk indices, ``chunks_per_group`` at a time (the last group may be shorter)."""
        step = max(1, chunks_per_group)
        for start in range(0, self.n_chunks, step):
            yield list(range(start, min(start + step, self.n_chunks)))

    def used_token_ids(self) -> np.ndarray:
        """Sorted distinct ids a backend will see (inputs and targets)."""
        used = self.tokens[: self.n_evaluated]
        extra = [self.bos_id] if self.bos_id is not None else []
        return np.unique(np.concatenate([used, np.asarray(extra, dtype=np.int32)]))


def plan_chunks(
    tokens: np.ndarray,
    n_ctx: int,
    *,
    source: Path,
    bos_id: int | None,
    max_chunks: int | None = None,
) -> ChunkPlan:
    """Cut ``tokens`` into chunks; too little text for two chunks is a UserInputError."""
    if n_ctx < MIN_N_CTX:
        raise UserInputError(f"--n-ctx {n_ctx}: must be at least {MIN_N_CTX}")
    if len(tokens) < 2 * n_ctx:
        raise InputFileError(
            source,
            f"tokenizes to only {len(tokens)} tokens, fewer than two chunks of --n-ctx {n_ctx}",
            f"give at least {2 * n_ctx} tokens of text or a smaller --n-ctx",
        )
    n_chunks = len(tokens) // n_ctx
    if max_chunks is not None:
        if max_chunks < 1:
            raise UserInputError(f"--max-chunks {max_chunks}: must be at least 1")
        n_chunks = min(n_chunks, max_chunks)
    return ChunkPlan(source=source, tokens=np.asarray(tokens, dtype=np.int32), n_ctx=n_ctx, n_chunks=n_chunks, bos_id=bos_id)


def prepare_tokens(
    text_path: str | Path,
    reference: ReferenceTokenizer,
    n_ctx: int,
    max_chunks: int | None = None,
) -> ChunkPlan:
    """Read, tokenize once and chunk the evaluation text."""
    text_path = Path(text_path)
    tokens = tokenize_text(read_eval_text(text_path), reference)
    return plan_chunks(tokens, n_ctx, source=text_path, bos_id=reference.bos_id, max_chunks=max_chunks)
