"""Evaluate artifacts on one token stream: the reference once (its log-probs stored), then each artifact.

The reference's log-probabilities go to a store (:mod:`quantmill.verify.logprob_store`) keyed by
the reference's content hash and the exact token ids; a later verify on the same reference and
tokens reads the store and the reference's figures back instead of running the reference again.
Every artifact then gets perplexity plus the comparison with the store (KL divergence, top-1
agreement, Δp) and a verdict against its quant type's thresholds.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from quantmill.atomic import atomic_file
from quantmill.errors import InputFileError
from quantmill.hashing import sha256_tree
from quantmill.jsonio import read_json_object
from quantmill.quantize.gguf.inspect import summarize_gguf
from quantmill.verify.backends import detect_format, open_backend
from quantmill.verify.backends.base import BackendOptions, ChunkLogProbs
from quantmill.verify.logprob_store import (
    LogProbStore,
    LogProbStoreWriter,
    StoreKey,
    StoreSink,
    cached_store,
    read_sidecar,
    remove_store,
    write_sidecar,
)
from quantmill.verify.metrics import DEFAULT_METRICS, MetricFactory, comparison_metrics, run_metrics
from quantmill.verify.thresholds import DEFAULT_THRESHOLDS, Threshold, threshold_for
from quantmill.verify.tokens import (
    ChunkPlan,
    ReferenceTokenizer,
    TokenizationCheck,
    compare_tokenizations,
    load_reference_tokenizer,
    prepare_tokens,
    read_eval_text,
)


@dataclass(frozen=True)
class ArtifactResult:
    """One artifact's figures. ``seconds`` covers evaluation only (not loading).

    ``failures`` lists the thresholds an artifact broke (empty: it passes); the reference has none.
    """

    path: Path
    format: str
    size_bytes: int
    bpw: float
    metrics: dict[str, float]
    seconds: float
    n_evaluated: int
    is_reference: bool = False
    quant_type: str = ""
    threshold: Threshold | None = None
    failures: tuple[str, ...] = ()
    tokenization: TokenizationCheck | None = None  # the artifact's own tokenizer vs the reference's (GGUF files)

    @property
    def ppl(self) -> float:
        return self.metrics["ppl"]

    @property
    def ppl_stderr(self) -> float:
        return self.metrics["ppl_stderr"]

    @property
    def passed(self) -> bool:
        return not self.failures

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
    n_tokens: int  # tokens evaluated (n_chunks × n_ctx)
    n_text_tokens: int  # tokens in the whole text
    token_sha256: str  # of the evaluated tokens
    bos_id: int | None
    store: Path | None = None
    reference_reused: bool = False
    results: tuple[ArtifactResult, ...] = field(default_factory=tuple)
    threads: int | None = None  # as the backends ran (None: every CPU this process may use)
    device: str = "cpu"

    @property
    def reference(self) -> ArtifactResult:
        return next(r for r in self.results if r.is_reference)

    @property
    def artifacts(self) -> tuple[ArtifactResult, ...]:
        return tuple(r for r in self.results if not r.is_reference)

    @property
    def failed(self) -> tuple[ArtifactResult, ...]:
        return tuple(r for r in self.artifacts if not r.passed)

    def delta_ppl_pct(self, result: ArtifactResult) -> float:
        """Perplexity change against the reference, in percent."""
        return 100.0 * (result.ppl / self.reference.ppl - 1.0)


def _progress(chunks: Iterator[ChunkLogProbs], total: int, label: str, enabled: bool) -> Iterator[ChunkLogProbs]:
    from quantmill.progress import LayerProgress

    bar = LayerProgress(f"verify {label}", total, bars=enabled, unit="chunk")
    try:
        for chunk in chunks:
            yield chunk
            bar.advance()
    finally:
        bar.close()


def prefetched(chunks: Iterator[ChunkLogProbs], depth: int = 2) -> Iterator[ChunkLogProbs]:
    """Run ``chunks`` in a worker thread, ``depth`` chunks ahead of the consumer.

    The backend's next model call (libllama and torch release the GIL) then overlaps the metrics
    of the chunk before it, as llama-perplexity overlaps its log-softmax workers with decoding.
    Exceptions in the worker are re-raised here; closing this generator stops the worker.
    """
    import queue
    import threading

    items: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for chunk in chunks:
                while not stop.is_set():
                    try:
                        items.put(("chunk", chunk), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    break
            items.put(("end", None))
        except BaseException as exc:  # handed to the consumer
            items.put(("error", exc))
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=work, name="verify-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            kind, payload = items.get()
            if kind == "end":
                return
            if kind == "error":
                raise payload
            yield payload
    finally:
        stop.set()
        while worker.is_alive():
            try:
                items.get(timeout=0.1)
            except queue.Empty:
                pass
        worker.join()


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
        own_tokens = getattr(backend, "own_tokens", None)  # artifacts that carry a tokenizer of their own
        tokenization = compare_tokenizations(plan.tokens, own_tokens(read_eval_text(plan.source))) if own_tokens else None
        started = time.perf_counter()
        chunks = prefetched(backend.iter_logprobs(plan))
        figures = run_metrics(_progress(chunks, plan.n_chunks, path.name, progress), metrics)
        seconds = time.perf_counter() - started
        info = backend.info
    return ArtifactResult(path, fmt, info.size_bytes, info.bpw, figures, seconds, plan.n_evaluated, is_reference,
                          info.quant_type, tokenization=tokenization)


def _reference_vocab_size(reference_dir: Path) -> int:
    path = reference_dir / "config.json"
    config = read_json_object(path, "pass the fp16 reference checkpoint")
    try:
        return int(config.get("text_config", config)["vocab_size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InputFileError(path, f"has no readable vocab_size ({exc})", "pass the fp16 reference checkpoint") from exc


def store_key(reference_dir: Path, plan: ChunkPlan, device: str = "cpu") -> StoreKey:
    """What the reference's stored log-probs depend on: its files, the exact tokens and the device it ran on."""
    return StoreKey(sha256_tree(reference_dir), plan.sha256, plan.n_ctx, plan.n_chunks, _reference_vocab_size(reference_dir),
                    device=device.partition(":")[0])


def default_store_path(key: StoreKey) -> Path:
    """``$QUANTMILL_CACHE/reference-logprobs/<hash of the key>.bin``."""
    import hashlib

    from quantmill.default_model import default_cache_dir

    digest = hashlib.sha256(json.dumps(key.record(), sort_keys=True).encode()).hexdigest()[:32]
    return default_cache_dir() / "reference-logprobs" / f"{digest}.bin"


# The cache of reference log-probs keeps the most recently used stores up to this many bytes.
STORE_CACHE_BYTES = 8 << 30


def prune_store_cache(directory: Path, keep: Path, limit: int = STORE_CACHE_BYTES) -> list[Path]:
    """Delete the least recently used stores (and sidecars) in ``directory`` beyond ``limit`` bytes; never ``keep``."""
    stores = sorted(directory.glob("*.bin"), key=lambda p: p.stat().st_mtime, reverse=True)
    total, removed = 0, []
    for store in stores:
        total += store.stat().st_size
        if total > limit and store.resolve() != keep.resolve():
            remove_store(store)
            removed.append(store)
    return removed


def _result_record(result: ArtifactResult) -> dict[str, Any]:
    return {"format": result.format, "size_bytes": result.size_bytes, "bpw": result.bpw, "metrics": result.metrics,
            "seconds": result.seconds, "n_evaluated": result.n_evaluated, "quant_type": result.quant_type}


def _reference_from_sidecar(reference_dir: Path, sidecar: Mapping[str, Any]) -> ArtifactResult:
    record = sidecar["reference"]
    return ArtifactResult(reference_dir, record["format"], record["size_bytes"], record["bpw"], dict(record["metrics"]),
                          record["seconds"], record["n_evaluated"], True, record["quant_type"])


def _reference_from_foreign_store(store_path: Path, plan: ChunkPlan) -> ArtifactResult:
    """A store quantmill did not write (e.g. ``llama-perplexity --kl-divergence-base``): it must hold exactly
    this evaluation's tokens; it is never overwritten. The base's perplexity comes from its stored rows."""
    store = LogProbStore(store_path)
    store.check_plan(plan)
    chunks = (ChunkLogProbs(i, store.chunk(i)[0], plan.chunk_targets(i)) for i in range(plan.n_chunks))
    size = store_path.stat().st_size
    return ArtifactResult(store_path, "logprobs", size, math.nan, run_metrics(chunks), 0.0, plan.n_evaluated, True, "base")


def measure_reference(
    reference_dir: Path,
    plan: ChunkPlan,
    tokenizer: ReferenceTokenizer,
    options: BackendOptions,
    store_path: Path,
    key: StoreKey,
    *,
    progress: bool = False,
) -> tuple[ArtifactResult, bool]:
    """The reference's figures and a finished store at ``store_path``; (result, reused from the store)."""
    sidecar = cached_store(store_path, key)
    if sidecar is not None:
        return _reference_from_sidecar(reference_dir, sidecar), True
    if store_path.is_file() and read_sidecar(store_path) is None:
        return _reference_from_foreign_store(store_path, plan), True
    remove_store(store_path)
    with atomic_file(store_path) as tmp, tmp.open("wb") as fh:
        writer = LogProbStoreWriter(fh, plan, key.n_vocab)
        result = evaluate_artifact(reference_dir, plan, tokenizer, options, is_reference=True, progress=progress,
                                   metrics=(*DEFAULT_METRICS, lambda: StoreSink(writer)))
    write_sidecar(store_path, key, result.metrics, {"reference": _result_record(result), "reference_dir": str(reference_dir)})
    return result, False


def judge(result: ArtifactResult, reference: ArtifactResult, threshold: Threshold) -> ArtifactResult:
    """``result`` with its threshold and the limits it breaks."""
    figures = {**result.metrics, "delta_ppl_pct": 100.0 * (result.ppl / reference.ppl - 1.0)}
    failures = list(threshold.failures(figures))
    if result.tokenization is not None and (tokenization := result.tokenization.failure()) is not None:
        failures.append(tokenization)
    return replace(result, threshold=threshold, failures=tuple(failures))


def verify_artifacts(
    artifacts: Sequence[str | Path],
    reference_dir: str | Path,
    text: str | Path,
    n_ctx: int,
    options: BackendOptions,
    *,
    max_chunks: int | None = None,
    progress: bool = False,
    store: str | Path | None = None,
    thresholds: Mapping[str, Threshold] = DEFAULT_THRESHOLDS,
    limits: Mapping[Path, Threshold] | None = None,
) -> VerifyResult:
    """Tokenize ``text`` once with the reference tokenizer; measure the reference and every artifact.

    The reference checkpoint (``reference_dir``) is measured first (or read back from its store),
    whether or not it is listed among ``artifacts``; duplicates are measured once. ``store`` is
    where the reference's log-probs live (default: the cache, keyed by reference and tokens). An artifact
    must hold its quant type's row of ``thresholds`` and, where ``limits`` has one for its path, that too.
    """
    reference_dir = Path(reference_dir)
    tokenizer = load_reference_tokenizer(reference_dir)
    plan = prepare_tokens(text, tokenizer, n_ctx, max_chunks)
    for path in artifacts:
        if detect_format(Path(path)) == "gguf":  # fail on a bad path or a family llama.cpp cannot run, before hours of work
            summarize_gguf(Path(path)).require("verify-gguf")
    ordered: list[Path] = []
    for path in map(Path, artifacts):
        if path.resolve() != reference_dir.resolve() and all(path.resolve() != seen.resolve() for seen in ordered):
            ordered.append(path)
    key = store_key(reference_dir, plan, options.device)
    store_path = Path(store) if store is not None else default_store_path(key)
    reference, reused = measure_reference(reference_dir, plan, tokenizer, options, store_path, key, progress=progress)
    if store is None:
        store_path.touch()  # most recently used
        prune_store_cache(store_path.parent, keep=store_path)
    logprobs = LogProbStore(store_path)
    logprobs.check_plan(plan)
    results = [reference]
    for path in ordered:
        measured = evaluate_artifact(path, plan, tokenizer, options, metrics=comparison_metrics(logprobs), progress=progress)
        threshold = threshold_for(measured.quant_type, thresholds)
        extra = (limits or {}).get(path)
        results.append(judge(measured, reference, threshold if extra is None else threshold.stricter(extra)))
    return VerifyResult(
        reference_dir=reference_dir,
        text=Path(text),
        n_ctx=n_ctx,
        n_chunks=plan.n_chunks,
        n_tokens=plan.n_evaluated,
        n_text_tokens=int(plan.tokens.size),
        token_sha256=plan.sha256,
        bos_id=plan.bos_id,
        store=store_path,
        reference_reused=reused,
        results=tuple(results),
        threads=options.threads,
        device=options.device,
    )


def verify_on_devices(
    artifacts: Sequence[str | Path],
    reference_dir: str | Path,
    text: str | Path,
    n_ctx: int,
    options: BackendOptions,
    devices: Sequence[str],
    *,
    store: str | Path | None = None,
    **kwargs: Any,
) -> tuple[VerifyResult, ...]:
    """:func:`verify_artifacts` once per device (resolved names: cpu, cuda[:N]), the reference run on each device.

    ``store`` is the first device's reference store; the others keep theirs in the cache, keyed by device."""
    return tuple(verify_artifacts(artifacts, reference_dir, text, n_ctx, replace(options, device=device),
                                  store=store if i == 0 else None, **kwargs) for i, device in enumerate(devices))
