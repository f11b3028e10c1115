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

from quantmill.verify.backends.base import ChunkLogProbs


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


MetricFactory = Callable[[], Metric]

# The metrics every artifact gets; comparison metrics join once reference log-probs are stored.
DEFAULT_METRICS: tuple[MetricFactory, ...] = (Perplexity,)


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
