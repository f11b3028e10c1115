"""KL divergence, top-1 agreement, the stored reference log-probs, the verdict and the report plot.

The stored log-probs use llama-perplexity's ``--kl-divergence-base`` format; the parity test
hands quantmill's store to ``llama-perplexity --kl-divergence`` and reads llama.cpp's own
store back, so both the arithmetic and the file format are checked against the real tool.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import re
import string
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import error_lines
from tiny_gguf import bpe_vocab, write_tiny_gguf

from quantmill.cli import main
from quantmill.reference_tools import llama_cpp_tool
from quantmill.verify.backends.base import BackendOptions, ChunkLogProbs, log_softmax_rows
from quantmill.verify.evaluate import verify_artifacts
from quantmill.verify.logprob_store import LogProbStore, LogProbStoreWriter, decode_rows, encode_rows, row_width
from quantmill.verify.metrics import ReferenceComparison
from quantmill.verify.report import write_report
from quantmill.verify.thresholds import DEFAULT_THRESHOLDS, load_thresholds, parse_threshold_option
from quantmill.verify.tokens import plan_chunks

N_CTX = 64
OPTIONS = BackendOptions(threads=2)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny f32 GGUF, the HF reference converted from it, and another model with the same vocabulary."""
    from quantmill.convert.gguf_to_hf import gguf_to_hf

    root = tmp_path_factory.mktemp("compare")
    vocab = dataclasses.replace(bpe_vocab(), add_bos=True)
    same = root / "same-F32.gguf"
    write_tiny_gguf(same, vocab, tied=False, seed=3)
    other = root / "other-F32.gguf"
    write_tiny_gguf(other, vocab, tied=False, seed=4)
    reference = root / "reference"
    gguf_to_hf(same, reference, dtype="float32", progress=False)
    text = root / "eval.txt"
    text.write_text(inspect.getsource(string)[:3000] + inspect.getsource(dataclasses)[:3000], encoding="utf-8")
    return {"same": same, "other": other, "reference": reference, "text": text, "root": root}


def _random_logprobs(rng: np.random.Generator, rows: int, vocab: int, spread: float) -> np.ndarray:
    return log_softmax_rows(rng.normal(0.0, spread, size=(rows, vocab)).astype(np.float32))


def test_store_rows_round_trip_within_half_a_step() -> None:
    rng = np.random.default_rng(0)
    logprobs = _random_logprobs(rng, 7, 101, spread=4.0)  # odd vocabulary: the row is padded
    encoded = encode_rows(logprobs)
    assert encoded.shape == (7, row_width(101)) == (7, 106)
    decoded, inside = decode_rows(encoded, 101)
    top = logprobs.max(axis=1, keepdims=True)
    window = logprobs > top - 16
    step = 16.0 / 65535 if np.ptp(logprobs) > 16 else (np.ptp(logprobs, axis=1, keepdims=True) / 65535)
    assert np.all(np.abs(decoded - logprobs)[window] <= np.max(step) * 0.5 + 1e-5)
    assert np.array_equal(np.argmax(decoded, axis=1), np.argmax(logprobs, axis=1))
    assert not np.any(inside & ~window)


def test_comparison_metric_equals_the_formula(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    vocab, n_ctx, n_chunks = 300, 16, 3
    tokens = rng.integers(0, vocab, size=n_ctx * n_chunks).astype(np.int32)
    plan = plan_chunks(tokens, n_ctx, source=tmp_path / "t.txt", bos_id=None)
    base = [_random_logprobs(rng, plan.n_scored, vocab, spread=2.5) for _ in range(n_chunks)]
    mine = [log_softmax_rows((b + rng.normal(0, 0.3, size=b.shape)).astype(np.float32)) for b in base]
    store_path = tmp_path / "base.bin"
    with store_path.open("wb") as fh:
        writer = LogProbStoreWriter(fh, plan, vocab)
        for i, rows in enumerate(base):
            writer.add(ChunkLogProbs(i, rows, plan.chunk_targets(i)))
    store = LogProbStore(store_path)
    store.check_plan(plan)
    assert np.array_equal(np.asarray(store.tokens), tokens)
    metric = ReferenceComparison(store)
    for i, rows in enumerate(mine):
        metric.update(ChunkLogProbs(i, rows, plan.chunk_targets(i)))
    got = metric.result()

    p = np.exp(np.concatenate(base).astype(np.float64))
    q = np.concatenate(mine).astype(np.float64)
    kld = (p * (np.log(p) - q)).sum(axis=1)
    same_top = np.mean(np.argmax(np.concatenate(base), axis=1) == np.argmax(q, axis=1))
    assert got["kld_mean"] == pytest.approx(kld.mean(), rel=1e-3)
    assert got["kld_p99"] == pytest.approx(np.percentile(kld, 99), rel=1e-3)
    assert got["kld_max"] == pytest.approx(kld.max(), rel=1e-3)
    assert got["top1_agreement"] == pytest.approx(same_top)
    assert 0.0 < got["top1_agreement"] < 1.0 and got["kld_mean"] > 0.01


def _llama_perplexity_or_skip() -> Path:
    tool = llama_cpp_tool("llama-perplexity")
    if not tool.is_file():
        pytest.skip(f"{tool} is not built (bash scripts/llama_cpp_source.sh --build)")
    return tool


_LLAMA_FIGURES = {
    "kld_mean": re.compile(r"Mean\s+KLD:\s+([0-9.eE+-]+)"),
    "kld_p99": re.compile(r"99\.0%\s+KLD:\s+([0-9.eE+-]+)"),
    "top1_pct": re.compile(r"Same top p:\s+([0-9.]+)"),
    "ppl": re.compile(r"Mean PPL\(Q\)\s+:\s+([0-9.]+)"),
}


def llama_kl_divergence(tool: Path, gguf: Path, store: Path, n_ctx: int) -> dict[str, float]:
    """llama-perplexity --kl-divergence against ``store``; its summary figures.

    Once, on a saturated machine, llama-perplexity stopped two chunks short with exit status 0 and
    no summary; once its summary broke off after "Mean KLD" (llama.cpp's log thread had not written the rest
    when the process exited). A run missing any figure is repeated, up to three runs, before the test fails.
    """
    for _attempt in range(3):
        done = subprocess.run([str(tool), "-m", str(gguf), "--kl-divergence-base", str(store), "--kl-divergence",
                               "-c", str(n_ctx), "-b", str(n_ctx), "-t", "2"], capture_output=True, text=True,
                              timeout=600, check=False)
        log = done.stdout + done.stderr
        assert done.returncode == 0, log[-2000:]
        if all(pattern.search(log) for pattern in _LLAMA_FIGURES.values()):
            break
    figures = {}
    for name, pattern in _LLAMA_FIGURES.items():
        match = pattern.search(log)
        assert match is not None, f"{name} not in llama-perplexity's output:\n{log[-2000:]}"
        figures[name] = float(match.group(1))
    return figures


def test_kld_and_top1_agree_with_llama_perplexity(models: dict[str, Path], tmp_path: Path) -> None:
    """quantmill's store, read by llama-perplexity: the same KLD, 99% KLD and same-top within 1% relative."""
    tool = _llama_perplexity_or_skip()
    store = tmp_path / "reference.kld"
    result = verify_artifacts([models["other"], models["same"]], models["reference"], models["text"], N_CTX, OPTIONS,
                              store=store)
    _, other, same = result.results
    assert other.metrics["kld_mean"] > 0.05 and same.metrics["kld_mean"] < 1e-3
    theirs = llama_kl_divergence(tool, models["other"], store, N_CTX)
    assert other.metrics["kld_mean"] == pytest.approx(theirs["kld_mean"], rel=0.01)
    assert other.metrics["kld_p99"] == pytest.approx(theirs["kld_p99"], rel=0.01)
    assert 100 * other.metrics["top1_agreement"] == pytest.approx(theirs["top1_pct"], rel=0.01)
    assert other.ppl == pytest.approx(theirs["ppl"], rel=1e-3)


def test_llama_perplexity_store_reads_back(models: dict[str, Path], tmp_path: Path) -> None:
    """A store written by llama-perplexity from the f32 GGUF: same tokens as quantmill's, nearly the same rows."""
    tool = _llama_perplexity_or_skip()
    theirs = tmp_path / "llama.kld"
    done = subprocess.run([str(tool), "-m", str(models["same"]), "-f", str(models["text"]), "-c", str(N_CTX),
                           "-b", str(N_CTX), "-t", "2", "--kl-divergence-base", str(theirs)], capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    ours = tmp_path / "ours.kld"
    verify_artifacts([], models["reference"], models["text"], N_CTX, OPTIONS, store=ours)
    a, b = LogProbStore(ours), LogProbStore(theirs)
    assert (a.n_ctx, a.n_vocab, a.n_chunks) == (b.n_ctx, b.n_vocab, b.n_chunks)
    assert np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens)), "tokenization differs from llama.cpp's"
    for index in range(a.n_chunks):
        (la, ma), (lb, mb) = a.chunk(index), b.chunk(index)
        assert np.abs(la - lb)[ma & mb].max() < 1e-2  # torch fp32 vs libllama with an f16 KV cache

    # llama.cpp's store as the base of quantmill's comparison: used as it is, never overwritten
    digest = hashlib.sha256(theirs.read_bytes()).hexdigest()
    result = verify_artifacts([models["other"]], models["reference"], models["text"], N_CTX, OPTIONS, store=theirs)
    assert result.reference_reused and hashlib.sha256(theirs.read_bytes()).hexdigest() == digest
    other = result.results[1]
    expected = llama_kl_divergence(tool, models["other"], theirs, N_CTX)
    assert other.metrics["kld_mean"] == pytest.approx(expected["kld_mean"], rel=0.01)
    assert 100 * other.metrics["top1_agreement"] == pytest.approx(expected["top1_pct"], rel=0.01)


def test_reference_is_run_once(models: dict[str, Path], tmp_path: Path) -> None:
    store = tmp_path / "ref.kld"
    first = verify_artifacts([models["other"]], models["reference"], models["text"], N_CTX, OPTIONS, store=store, max_chunks=6)
    digest = hashlib.sha256(store.read_bytes()).hexdigest()
    second = verify_artifacts([models["other"]], models["reference"], models["text"], N_CTX, OPTIONS, store=store, max_chunks=6)
    assert not first.reference_reused and second.reference_reused
    assert hashlib.sha256(store.read_bytes()).hexdigest() == digest
    assert second.reference.metrics == first.reference.metrics
    assert second.results[1].metrics == first.results[1].metrics
    assert store.stat().st_size == 8 + 12 + 4 * 6 * N_CTX + 2 * 6 * (N_CTX // 2 - 1) * row_width(len(bpe_vocab().tokens))
    # other tokens (fewer chunks) → the store is recomputed, not misused
    third = verify_artifacts([], models["reference"], models["text"], N_CTX, OPTIONS, store=store, max_chunks=5)
    assert not third.reference_reused and LogProbStore(store).n_chunks == 5


def test_truncated_store_is_a_one_line_error(models: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "ref.kld"
    base = ["verify", str(models["other"]), "--reference", str(models["reference"]), "--text", str(models["text"]),
            "--n-ctx", str(N_CTX), "--max-chunks", "4", "--reference-logprobs", str(store),
            "--threshold", "F32:max_kld_mean=100,min_top1_agreement=0,max_delta_ppl_pct=1e9"]
    assert main(base) == 0
    with store.open("r+b") as fh:
        fh.truncate(store.stat().st_size - 10)
    assert main(base) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and str(store) in err[0] and "truncated" in err[0]


def test_failing_artifact_exits_1_with_the_report_written(models: dict[str, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    args = ["verify", str(models["other"]), str(models["same"]), "--reference", str(models["reference"]),
            "--text", str(models["text"]), "--n-ctx", str(N_CTX), "--max-chunks", "4", "--report-dir", str(out),
            "--reference-logprobs", str(tmp_path / "ref.kld")]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "other-F32.gguf" in captured.err.splitlines()[-1] and "1 of 2" in captured.err
    report = json.loads((out / "report.json").read_text())
    verdicts = {Path(r["path"]).name: r["verdict"] for r in report["artifacts"]}
    assert verdicts == {"reference": "reference", "other-F32.gguf": "FAIL", "same-F32.gguf": "pass"}
    assert report["passed"] is False
    assert "FAIL" in (out / "report.md").read_text() and "fails its F32 thresholds" in captured.out
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a loose enough threshold lets it pass
    assert main([*args, "--threshold", "F32:max_kld_mean=50,min_top1_agreement=0,max_delta_ppl_pct=1e9"]) == 0


def test_report_files_are_byte_identical_across_runs(models: dict[str, Path], tmp_path: Path) -> None:
    result = verify_artifacts([models["same"]], models["reference"], models["text"], N_CTX, OPTIONS,
                              store=tmp_path / "ref.kld", max_chunks=3)
    result = dataclasses.replace(result, results=tuple(dataclasses.replace(r, seconds=1.0) for r in result.results))
    a = write_report(result, tmp_path / "a")
    b = write_report(result, tmp_path / "b")
    for kind in ("markdown", "json", "png"):
        assert a[kind].read_bytes() == b[kind].read_bytes(), kind


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("Q4_K_M", "TYPE:FIELD=VALUE"),
        ("Q4_K_M:kld=0.1", "unknown field 'kld'"),
        ("Q4_K_M:max_kld_mean=lots", "not a number"),
        ("Q4_K_M:min_top1_agreement=-1", "≥ 0"),
        ("Q4_K_M:kld_mean=0.1", "is now called 'max_kld_mean'"),
    ],
)
def test_bad_threshold_option_exit_2(models: dict[str, Path], option: str, message: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["verify", "--reference", str(models["reference"]), "--text", str(models["text"]), "--threshold", option])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]


def test_threshold_table_overrides(tmp_path: Path) -> None:
    path = tmp_path / "limits.json"
    path.write_text(json.dumps({"q4_k_m": {"max_kld_mean": 0.5}, "NEW_TYPE": {"min_top1_agreement": 0.2}}))
    table = load_thresholds(path, ["Q4_K_M:min_top1_agreement=0.5"])
    assert table["Q4_K_M"].max_kld_mean == 0.5 and table["Q4_K_M"].min_top1_agreement == 0.5
    assert table["Q4_K_M"].max_delta_ppl_pct == DEFAULT_THRESHOLDS["Q4_K_M"].max_delta_ppl_pct
    assert table["NEW_TYPE"].min_top1_agreement == 0.2 and table["NEW_TYPE"].max_kld_mean == DEFAULT_THRESHOLDS["*"].max_kld_mean
    assert parse_threshold_option("q8_0:max_kld_mean=0.01, min_top1_agreement=0.9") == ("Q8_0", {"max_kld_mean": "0.01", "min_top1_agreement": "0.9"})
    limits = DEFAULT_THRESHOLDS["Q8_0"]
    assert limits.failures({"kld_mean": 0.001, "top1_agreement": 0.99, "delta_ppl_pct": 0.2}) == []
    assert len(limits.failures({"kld_mean": math.nan, "top1_agreement": 0.99, "delta_ppl_pct": 0.2})) == 1
    # types get stricter limits as they get more bits
    order = ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16"]
    klds = [DEFAULT_THRESHOLDS[t].max_kld_mean for t in order]
    assert klds == sorted(klds, reverse=True)


def test_store_cache_keeps_the_most_recent_within_its_limit(tmp_path: Path) -> None:
    import os

    from quantmill.verify.evaluate import prune_store_cache

    for i, name in enumerate(["old", "mid", "new"]):
        store = tmp_path / f"{name}.bin"
        store.write_bytes(b"x" * 100)
        (tmp_path / f"{name}.bin.json").write_text("{}")
        os.utime(store, (1000 + i, 1000 + i))
    removed = prune_store_cache(tmp_path, keep=tmp_path / "old.bin", limit=250)
    assert [p.name for p in removed] == []  # 'old' is over the limit but is the one in use
    removed = prune_store_cache(tmp_path, keep=tmp_path / "new.bin", limit=250)
    assert [p.name for p in removed] == ["old.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mid.bin", "mid.bin.json", "new.bin", "new.bin.json"]
