"""What every verify backend provides: per chunk, the log-probabilities of the scored positions.

A backend runs one artifact (a GGUF file, an HF checkpoint, later a GPTQ branch) over the
chunks of a :class:`~quantmill.verify.tokens.ChunkPlan` and yields, chunk by chunk and in
chunk order, float32 log-probabilities of shape ``[plan.n_scored, n_vocab]`` for logit
positions ``plan.first … n_ctx-2``. Metrics (:mod:`quantmill.verify.metrics`) only ever see
these arrays, so perplexity, KL divergence and top-1 agreement are computed the same way for
every backend.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from quantmill.errors import UnsupportedError
from quantmill.verify.tokens import ChunkPlan

# llama-perplexity's default logical batch: it evaluates 2048 // n_ctx chunks per decode call.
DEFAULT_BATCH_TOKENS = 2048


@dataclass(frozen=True)
class BackendOptions:
    """How to run a backend.

    ``threads`` None means every CPU this process may use; ``chunks_per_batch`` None means
    llama-perplexity's choice, ``2048 // n_ctx`` (batching changes the last digits of the
    figures, so the same choice gives the same figures as llama-perplexity). Every backend runs on
    the CPU in this version: another ``device`` is refused here, once for all of them.
    """

    threads: int | None = None
    chunks_per_batch: int | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.device != "cpu":
            raise UnsupportedError(f"--device {self.device}: verify backends run on cpu only in this version")

    def chunks_for(self, n_ctx: int) -> int:
        if self.chunks_per_batch is not None and self.chunks_per_batch > 0:
            return self.chunks_per_batch
        return max(1, DEFAULT_BATCH_TOKENS // n_ctx)

    @property
    def n_threads(self) -> int:
        if self.threads is not None and self.threads > 0:
            return self.threads
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class ArtifactInfo:
    """Size figures of an artifact: bytes on disk, and bits per weight of its tensor data."""

    path: Path
    format: str
    size_bytes: int
    bpw: float
    n_vocab: int
    quant_type: str = ""  # F16, Q4_K_M, GPTQ-4bit ...: the key of the verdict's threshold table


@dataclass(frozen=True)
class ChunkLogProbs:
    """Log-probabilities of one chunk's scored positions, and the tokens they must predict."""

    index: int
    logprobs: np.ndarray  # float32 [n_scored, n_vocab]
    targets: np.ndarray  # int32 [n_scored]


class LogProbBackend(Protocol):
    """One loaded artifact. Use as a context manager; ``close`` frees the model."""

    info: ArtifactInfo

    def iter_logprobs(self, plan: ChunkPlan) -> Iterator[ChunkLogProbs]: ...

    def check_vocabulary(self, plan: ChunkPlan, id_to_token: dict[int, str]) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> LogProbBackend: ...

    def __exit__(self, *exc: object) -> None: ...


def log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax into a new float32 array (max-subtracted; sums of exps in float64)."""
    logits = np.asarray(logits, dtype=np.float32)
    out = np.subtract(logits, logits.max(axis=-1, keepdims=True))
    log_norm = np.log(np.exp(out).sum(axis=-1, keepdims=True, dtype=np.float64))
    out -= log_norm.astype(np.float32)
    return out


def vocabulary_mismatches(
    used_ids: np.ndarray, reference: dict[int, str], artifact: dict[int, str | None]
) -> list[tuple[int, str, str | None]]:
    """(id, reference token, artifact token) for every used id whose token text differs."""
    return [
        (int(i), reference[int(i)], artifact.get(int(i)))
        for i in used_ids
        if int(i) in reference and artifact.get(int(i)) != reference[int(i)]
    ]
