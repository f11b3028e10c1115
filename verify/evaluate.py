"""Evaluate artifacts on one token stream: the reference first, then each artifact in turn."""
from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from quantmill.verify.backends import detect_format, open_backend
from quantmill.verify.backends.base import BackendOptions, ChunkLogProbs
from quantmill.verify.metrics import DEFAULT_METRICS, MetricFactory, run_metrics
from quantmill.verify.tokens import ChunkPlan, ReferenceTokenizer, load_reference_tokenizer, prepare_tokens


@dataclass(frozen=True)
class ArtifactResult:
    """One artifact's figures. ``seconds`` covers evaluation only (not loading)."""

    path: Path
    format: str
    size_bytes: int
    bpw: float
    metrics: dict[str, float]
    seconds: float
    n_evaluated: int
    is_reference: bool = False

    @property
    def ppl(self) -> float:
        return self.metrics["ppl"]

    @property
    def ppl_stderr(self) -> float:
        return self.metrics["ppl_stderr"]

    @property
    def tokens_per_second(self) -> float:
        return self.n_evaluated / self.seconds if self.seconds > 0 else math.nan


@dataclass(frozen=True)
class VerifyResult:
    """Every artifact's figures plus what they were measured on."""

    reference_dir: Path
    text: Path
    n_ctx: int
    n_chunks: int
    n_tokens: int
    token_sha256: str
    bos_id: int | None
    results: tuple[ArtifactResult, ...] = field(default_factory=tuple)

    @property
    def reference(self) -> ArtifactResult:
        return next(r for r in self.results if r.is_reference)

    def delta_ppl_pct(self, result: ArtifactResult) -> float:
        """Perplexity change against the reference, in percent."""
        return 100.0 * (result.ppl / self.reference.ppl - 1.0)


def _progress(chunks: Iterator[ChunkLogProbs], total: int, label: str, enabled: bool) -> Iterator[ChunkLogProbs]:
    from tqdm import tqdm

    with tqdm(total=total, desc=label, unit="chunk", disable=not enabled, leave=False) as bar:
        for chunk in chunks:
            yield chunk
            bar.update(1)


def evaluate_artifact(
    path: Path,
    plan: ChunkPlan,
    reference: ReferenceTokenizer,
    options: BackendOptions,
    *,
    metrics: Sequence[MetricFactory] = DEFAULT_METRICS,
    is_reference: bool = False,
    progress: bool = False,
) -> ArtifactResult:
    """Run one artifact over ``plan`` and measure it."""
    fmt = detect_format(path)
    used = plan.used_token_ids()
    id_to_token = {int(i): text for i in used if (text := reference.id_to_token(int(i))) is not None}
    with open_backend(path, options, fmt) as backend:
        backend.check_vocabulary(plan, id_to_token)
        started = time.perf_counter()
        figures = run_metrics(_progress(backend.iter_logprobs(plan), plan.n_chunks, path.name, progress), metrics)
        seconds = time.perf_counter() - started
        info = backend.info
    return ArtifactResult(path, fmt, info.size_bytes, info.bpw, figures, seconds, plan.n_evaluated, is_reference)


def verify_artifacts(
    artifacts: Sequence[str | Path],
    reference_dir: str | Path,
    text: str | Path,
    n_ctx: int,
    options: BackendOptions,
    *,
    max_chunks: int | None = None,
    progress: bool = False,
) -> VerifyResult:
    """Tokenize ``text`` once with the reference tokenizer; measure the reference and every artifact.

    The reference checkpoint (``reference_dir``) is always measured, first, whether or not it is
    listed among ``artifacts``; duplicates are measured once.
    """
    reference_dir = Path(reference_dir)
    tokenizer = load_reference_tokenizer(reference_dir)
    plan = prepare_tokens(text, tokenizer, n_ctx, max_chunks)
    for path in artifacts:
        detect_format(Path(path))  # fail on a bad path before hours of work, not after
    ordered: list[Path] = [reference_dir]
    for path in map(Path, artifacts):
        if all(path.resolve() != seen.resolve() for seen in ordered):
            ordered.append(path)
    results = tuple(
        evaluate_artifact(path, plan, tokenizer, options, is_reference=(i == 0), progress=progress)
        for i, path in enumerate(ordered)
    )
    return VerifyResult(
        reference_dir=reference_dir,
        text=Path(text),
        n_ctx=n_ctx,
        n_chunks=plan.n_chunks,
        n_tokens=int(plan.tokens.size),
        token_sha256=plan.sha256,
        bos_id=plan.bos_id,
        results=results,
    )
