"""The reference's log-probabilities, computed once and stored compactly.

The file is exactly llama-perplexity's ``--kl-divergence-base`` format, so a store quantmill
writes from the torch reference can be handed to ``llama-perplexity --kl-divergence`` and a
store llama.cpp wrote can be read here:

    "_logits_"  u32 n_ctx  i32 n_vocab  i32 n_chunk  i32 tokens[n_ctx × n_chunk]
    then, per chunk and per scored position (n_ctx - 1 - n_ctx//2 of them), ``nv`` uint16:
    the first four hold two float32 (scale, min_log_prob), then one uint16 per vocabulary entry,
    padded to an even count: nv = 2·⌈n_vocab / 2⌉ + 4.

A row keeps the 16 nats below its most likely token: log p ≈ min_log_prob + scale·q, with
q = 0 for everything 16 nats or more below the top (those terms are left out of the KL sum,
as llama-perplexity does). That costs 2 bytes per vocabulary entry instead of 4, and the
quantization error (≤ 16 / 65535 / 2 nats) is far below any KL divergence worth reporting.

Next to the store, ``<store>.json`` records what it was computed from (reference content hash,
token sha256, n_ctx, chunks) and the reference's own figures, so a later verify with the same
inputs reuses it without running the reference again.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from quantmill.atomic import write_text_atomic
from quantmill.errors import InputFileError
from quantmill.verify.backends.base import ChunkLogProbs
from quantmill.verify.tokens import ChunkPlan

MAGIC = b"_logits_"
WINDOW_NATS = 16.0  # log-probs kept below each row's maximum
LEVELS = 65535.0
STORE_VERSION = 1


def row_width(n_vocab: int) -> int:
    """uint16 entries per stored row: two float32 in front, the vocabulary padded to even."""
    return 2 * ((n_vocab + 1) // 2) + 4


def encode_rows(logprobs: np.ndarray) -> np.ndarray:
    """float32 log-probs [rows, n_vocab] → uint16 [rows, row_width(n_vocab)]."""
    logprobs = np.asarray(logprobs, dtype=np.float32)
    rows, n_vocab = logprobs.shape
    top = logprobs.max(axis=1)
    low = np.maximum(logprobs.min(axis=1), top - np.float32(WINDOW_NATS))
    scale = ((top - low) / np.float32(LEVELS)).astype(np.float32)
    out = np.zeros((rows, row_width(n_vocab)), dtype=np.uint16)
    header = np.stack([scale, low], axis=1).astype("<f4")
    out[:, :4] = header.view("<u2")
    safe = np.where(scale > 0, scale, np.float32(1.0))[:, None]
    levels = np.rint((logprobs - low[:, None]) / safe)
    levels = np.where((logprobs > low[:, None]) & (scale[:, None] > 0), levels, 0.0)
    out[:, 4 : 4 + n_vocab] = np.clip(levels, 0, LEVELS).astype(np.uint16)
    return out


def decode_rows(encoded: np.ndarray, n_vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """uint16 rows → (float32 log-probs [rows, n_vocab], bool mask of entries inside the window)."""
    encoded = np.asarray(encoded)
    header = np.ascontiguousarray(encoded[:, :4]).view("<f4")
    scale, low = header[:, 0:1], header[:, 1:2]
    levels = encoded[:, 4 : 4 + n_vocab]
    logprobs = low + scale * levels.astype(np.float32)
    return logprobs, logprobs > np.float32(-WINDOW_NATS)


@dataclass(frozen=True)
class StoreKey:
    """What a store was computed from; a store is reused only when every field matches."""

    reference_sha256: str
    token_sha256: str
    n_ctx: int
    n_chunks: int
    n_vocab: int
    version: int = STORE_VERSION
    device: str = "cpu"  # where the reference ran: a CUDA reference is stored apart from the CPU one

    def record(self) -> dict[str, Any]:
        """The key as JSON data; a CPU key without its device, as stores were keyed before devices were."""
        record = asdict(self)
        if self.device == "cpu":
            del record["device"]
        return record


def _header_size(n_ctx: int, n_chunks: int) -> int:
    return len(MAGIC) + 4 + 4 + 4 + 4 * n_ctx * n_chunks


class LogProbStoreWriter:
    """Writes a store chunk by chunk, in chunk order, under a temporary name."""

    def __init__(self, fh: BinaryIO, plan: ChunkPlan, n_vocab: int) -> None:
        self._fh = fh
        self._plan = plan
        self._n_vocab = n_vocab
        self._next = 0
        fh.write(MAGIC)
        fh.write(np.asarray([plan.n_ctx], dtype="<u4").tobytes())
        fh.write(np.asarray([n_vocab, plan.n_chunks], dtype="<i4").tobytes())
        fh.write(np.ascontiguousarray(plan.tokens[: plan.n_evaluated], dtype="<i4").tobytes())

    def add(self, chunk: ChunkLogProbs) -> None:
        if chunk.logprobs.shape[1] != self._n_vocab:
            raise ValueError(f"chunk has {chunk.logprobs.shape[1]} log-probs per row, the store {self._n_vocab}")
        if chunk.index != self._next:
            raise ValueError(f"chunks must come in order: expected {self._next}, got {chunk.index}")
        self._fh.write(encode_rows(chunk.logprobs).astype("<u2").tobytes())
        self._next += 1


class LogProbStore:
    """A finished store, memory-mapped; ``chunk(i)`` decodes one chunk's rows."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            with self.path.open("rb") as fh:
                head = fh.read(len(MAGIC) + 12)
        except OSError as exc:
            raise InputFileError(self.path, f"cannot be read ({exc.strerror})", "re-create the reference log-probs") from exc
        if len(head) < len(MAGIC) + 12 or head[: len(MAGIC)] != MAGIC:
            raise InputFileError(self.path, "not a log-probability store (bad magic)",
                                 "give a file written by quantmill verify or llama-perplexity --kl-divergence-base")
        self.n_ctx = int(np.frombuffer(head, "<u4", 1, len(MAGIC))[0])
        self.n_vocab, self.n_chunks = (int(v) for v in np.frombuffer(head, "<i4", 2, len(MAGIC) + 4))
        self.n_scored = self.n_ctx - 1 - self.n_ctx // 2
        width = row_width(self.n_vocab)
        offset = _header_size(self.n_ctx, self.n_chunks)
        expected = offset + 2 * width * self.n_scored * self.n_chunks
        size = self.path.stat().st_size
        if self.n_ctx < 2 or self.n_vocab < 1 or self.n_chunks < 1 or size != expected:
            raise InputFileError(self.path, f"truncated or inconsistent log-probability store ({size} bytes, "
                                 f"expected {expected})", "delete it so that verify computes it again")
        self.tokens = np.fromfile(self.path, dtype="<i4", count=self.n_ctx * self.n_chunks, offset=len(MAGIC) + 12)
        self._offset = offset
        self._chunk_shape = (self.n_scored, width)

    def chunk(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(log-probs [n_scored, n_vocab], in-window mask) of chunk ``index``.

        Read with one ``pread`` per chunk rather than memory-mapped, so a multi-GB store does not
        show up in the process's resident memory as it is walked through.
        """
        if not 0 <= index < self.n_chunks:
            raise IndexError(f"chunk {index} outside 0..{self.n_chunks - 1}")
        size = 2 * self._chunk_shape[0] * self._chunk_shape[1]
        fd = os.open(self.path, os.O_RDONLY)
        try:
            raw = os.pread(fd, size, self._offset + index * size)
        finally:
            os.close(fd)
        rows = np.frombuffer(raw, dtype="<u2").reshape(self._chunk_shape)
        return decode_rows(rows, self.n_vocab)

    def check_plan(self, plan: ChunkPlan) -> None:
        """The store must have been computed on exactly this plan's tokens and chunking."""
        same = (self.n_ctx == plan.n_ctx and self.n_chunks >= plan.n_chunks
                and np.array_equal(np.asarray(self.tokens[: plan.n_evaluated]), plan.tokens[: plan.n_evaluated]))
        if not same:
            raise InputFileError(self.path, f"computed on other tokens or n_ctx (n_ctx {self.n_ctx}, {self.n_chunks} "
                                 f"chunks) than this evaluation (n_ctx {plan.n_ctx}, {plan.n_chunks} chunks)",
                                 "delete it or point --reference-logprobs elsewhere")


def sidecar_path(store: Path) -> Path:
    return store.with_name(store.name + ".json")


def read_sidecar(store: Path) -> dict[str, Any] | None:
    """The sidecar's content, or None when it is missing or unreadable (the store is then recomputed)."""
    try:
        return json.loads(sidecar_path(store).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def cached_store(store: Path, key: StoreKey) -> dict[str, Any] | None:
    """The sidecar of ``store`` when the store exists and was computed from ``key``; else None."""
    sidecar = read_sidecar(store)
    if sidecar is None or sidecar.get("key") != key.record() or not store.is_file():
        return None
    return sidecar


@dataclass
class StoreSink:
    """A metric that writes every chunk it sees into a store (used while the reference runs)."""

    writer: LogProbStoreWriter
    name: str = "reference-store"

    def update(self, chunk: ChunkLogProbs) -> None:
        self.writer.add(chunk)

    def result(self) -> dict[str, float]:
        return {}


def write_sidecar(store: Path, key: StoreKey, reference_figures: dict[str, float], extra: dict[str, Any]) -> None:
    payload = {"key": key.record(), "reference_metrics": reference_figures, **extra}
    write_text_atomic(sidecar_path(store), json.dumps(payload, indent=2, sort_keys=True) + "\n")


def remove_store(store: Path) -> None:
    for path in (store, sidecar_path(store)):
        if path.exists():
            os.unlink(path)
