"""Metrics over per-chunk log-probabilities, accumulated chunk by chunk.

A metric sees every :class:`~quantmill.verify.backends.base.ChunkLogProbs` of one artifact
in chunk order (``update``) and then reports named figures (``result``). Metrics that compare
with the fp16 reference (KL divergence, top-1 agreement) take the stored reference
log-probabilities when they are built and look chunks up by ``chunk.index``; the evaluation
loop does not change for them.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import numpy as np

from quantmill.errors import UserInputError
from quantmill.verify.backends.base import ChunkLogProbs
from quantmill.verify.logprob_store import LogProbStore


class Metric(Protocol):
    """An accumulator: ``update`` once per chunk, then ``result``."""

    name: str

    def update(self, chunk: ChunkLogProbs) -> None: ...

    def result(self) -> dict[str, float]: ...


def token_nll(chunk: ChunkLogProbs) -> np.ndarray:
    """Negative log-likelihood (float64) of each scored position's target token."""
    rows = np.arange(chunk.targets.shape[0])
    return -chunk.logprobs[rows, chunk.targets].astype(np.float64)


class Perplexity:
    """exp(mean NLL) over all scored tokens, with llama-perplexity's standard error.

    The error is that of the mean NLL, sqrt((E[nll²] - E[nll]²) / (N - 1)), carried to
    perplexity by the derivative of exp: ``ppl_stderr = ppl × stderr(mean NLL)``.
    """

    name = "perplexity"

    def __init__(self) -> None:
        self.count = 0
        self.nll_sum = 0.0
        self.nll2_sum = 0.0

    def update(self, chunk: ChunkLogProbs) -> None:
        nll = token_nll(chunk)
        self.count += int(nll.size)
        self.nll_sum += float(nll.sum())
        self.nll2_sum += float(np.square(nll).sum())

    def result(self) -> dict[str, float]:
        if self.count == 0:
            return {"ppl": math.nan, "ppl_stderr": math.nan, "nll": math.nan, "n_scored": 0.0}
        mean = self.nll_sum / self.count
        ppl = math.exp(mean)
        variance = self.nll2_sum / self.count - mean * mean
        stderr = math.sqrt(variance / (self.count - 1)) if variance > 0 and self.count > 1 else 0.0
        return {"ppl": ppl, "ppl_stderr": ppl * stderr, "nll": mean, "n_scored": float(self.count)}


def mean_and_stderr(total: float, total_sq: float, count: int) -> tuple[float, float]:
    """Mean and the standard error of the mean, as llama-perplexity computes them (0 below 11 values)."""
    if count < 1:
        return math.nan, math.nan
    mean = total / count
    variance = total_sq / count - mean * mean
    return mean, (math.sqrt(variance / (count - 1)) if variance > 0 and count > 10 else 0.0)


class ReferenceComparison:
    """KL divergence from the stored reference distributions, top-1 agreement and Δp, per scored token.

    For each scored position: KLD = Σ p_ref · (log p_ref − log q) over the reference's entries
    within 16 nats of its top (the rest are not stored; llama-perplexity sums the same terms);
    "same top" when the artifact's most likely token is the reference's (first maximum on ties);
    Δp = q(target) − p_ref(target). Percentiles interpolate linearly between sorted values.
    """

    name = "reference-comparison"

    def __init__(self, store: LogProbStore) -> None:
        self.store = store
        self.kld: list[np.ndarray] = []
        self.same_top = 0
        self.count = 0
        self.dp_sum = 0.0
        self.dp2_sum = 0.0

    def update(self, chunk: ChunkLogProbs) -> None:
        base, inside = self.store.chunk(chunk.index)
        n_vocab = base.shape[1]
        if chunk.logprobs.shape[1] < n_vocab:
            raise UserInputError(
                f"artifact has {chunk.logprobs.shape[1]} logits per token but the reference has {n_vocab}; "
                "compare artifacts made from the reference model"
            )
        mine = chunk.logprobs[:, :n_vocab]
        p_base = np.where(inside, np.exp(base), np.float32(0.0))
        kld = np.einsum("ij,ij->i", p_base, base - mine, dtype=np.float64)
        self.kld.append(kld)
        self.same_top += int(np.count_nonzero(np.argmax(base, axis=1) == np.argmax(mine, axis=1)))
        rows = np.arange(chunk.targets.shape[0])
        dp = np.exp(mine[rows, chunk.targets].astype(np.float64)) - np.exp(base[rows, chunk.targets].astype(np.float64))
        self.dp_sum += float(dp.sum())
        self.dp2_sum += float(np.square(dp).sum())
        self.count += int(rows.size)

    def result(self) -> dict[str, float]:
        if self.count == 0:
            return {}
        values = np.sort(np.concatenate(self.kld))
        mean, stderr = mean_and_stderr(float(values.sum()), float(np.square(values).sum()), self.count)
        top = self.same_top / self.count
        top_err = math.sqrt(top * (1.0 - top) / (self.count - 1)) if self.count > 1 else 0.0
        return {
            "kld_mean": mean,
            "kld_stderr": stderr,
            "kld_median": float(np.percentile(values, 50)),
            "kld_p99": float(np.percentile(values, 99)),
            "kld_max": float(values[-1]),
            "top1_agreement": top,
            "top1_stderr": top_err,
            "dp_rms": math.sqrt(self.dp2_sum / self.count),
        }


MetricFactory = Callable[[], Metric]

# The metrics every artifact gets; the comparison joins once the reference's log-probs are stored.
DEFAULT_METRICS: tuple[MetricFactory, ...] = (Perplexity,)


def comparison_metrics(store: LogProbStore) -> tuple[MetricFactory, ...]:
    """Perplexity plus the comparison with the stored reference."""
    return (*DEFAULT_METRICS, lambda: ReferenceComparison(store))


def run_metrics(chunks: Iterable[ChunkLogProbs], factories: Sequence[MetricFactory] = DEFAULT_METRICS) -> dict[str, float]:
    """Feed every chunk to fresh metrics; return their merged results."""
    metrics = [factory() for factory in factories]
    for chunk in chunks:
        for metric in metrics:
            metric.update(chunk)
    merged: dict[str, float] = {}
    for metric in metrics:
        merged |= metric.result()
    return merged
