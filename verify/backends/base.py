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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import numpy as np

from quantmill.device import check_device_name
from quantmill.errors import UnsupportedError, UserInputError
from quantmill.verify.tokens import ChunkPlan

# llama-perplexity's default logical batch: it evaluates 2048 // n_ctx chunks per decode call.
DEFAULT_BATCH_TOKENS = 2048


@dataclass(frozen=True)
class BackendOptions:
    """How to run a backend.

    ``threads`` None means every CPU this process may use; ``chunks_per_batch`` None means
    llama-perplexity's choice, ``2048 // n_ctx`` (batching changes the last digits of the
    figures, so the same choice gives the same figures as llama-perplexity). ``device`` is a resolved
    torch device (:func:`quantmill.device.resolve_device`): cpu or cuda[:N]; torch backends put the model
    and the ids there, the GGUF backend offloads every layer to the GPU.
    """

    threads: int | None = None
    chunks_per_batch: int | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if check_device_name(self.device) == "auto":
            raise UnsupportedError("BackendOptions.device: resolve auto first (quantmill.device.resolve_device)")

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

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


class LogProbBackend:
    """One loaded artifact. Use as a context manager; ``close`` frees the model."""

    path: Path
    info: ArtifactInfo

    def iter_logprobs(self, plan: ChunkPlan) -> Iterator[ChunkLogProbs]:
        raise NotImplementedError

    def check_vocabulary(self, plan: ChunkPlan, id_to_token: dict[int, str]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_token_ids(self, plan: ChunkPlan, id_to_token: dict[int, str], rows: str,
                         texts: tuple[Path, Callable[[int], str | None]] | None) -> None:
        """Every id the plan uses fits this artifact's ``rows`` ("output layer has {} rows") and, where it has token texts (``texts``: the
        file they come from, id → text), names the same token as the reference tokenizer."""
        used = plan.used_token_ids()
        if used.size and int(used[-1]) >= self.info.n_vocab:
            raise UserInputError(f"{self.path}: {rows.format(self.info.n_vocab)} but the reference tokenizer produced id "
                                 f"{int(used[-1])}; evaluate artifacts made from the reference model")
        if texts is None:
            return
        source, text_of = texts
        bad = [(i, id_to_token[i], got) for i in map(int, used) if i in id_to_token and (got := text_of(i)) != id_to_token[i]]
        if bad:
            token_id, ref, got = bad[0]
            raise UserInputError(f"{source}: vocabulary differs from the reference tokenizer on {len(bad)} used ids "
                                 f"(id {token_id}: {ref!r} vs {got!r}); evaluate artifacts made from the reference model")


def log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax into a new float32 array (max-subtracted; sums of exps in float64)."""
    logits = np.asarray(logits, dtype=np.float32)
    out = np.subtract(logits, logits.max(axis=-1, keepdims=True))
    log_norm = np.log(np.exp(out).sum(axis=-1, keepdims=True, dtype=np.float64))
    out -= log_norm.astype(np.float32)
    return out
