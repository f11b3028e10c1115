"""``quantmill verify``: perplexity of HF checkpoints (torch) and GGUF files (libllama) on the same tokens."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from tiny_gguf import bpe_vocab, spm_vocab, write_tiny_gguf
from verify_helpers import N_CTX, OPTIONS, model_pair, write_eval_text

from quantmill.cli import main
from quantmill.verify.backends import open_backend
from quantmill.verify.backends.base import BackendOptions, ChunkLogProbs
from quantmill.verify.evaluate import verify_artifacts
from quantmill.verify.metrics import Perplexity
from quantmill.verify.tokens import load_reference_tokenizer, plan_chunks, prepare_tokens, tokenize_text

GPL3 = Path("/usr/share/common-licenses/GPL-3")


@pytest.fixture(scope="module")
def eval_txt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_eval_text(tmp_path_factory.mktemp("eval"))


@pytest.fixture(scope="module", params=[False, True], ids=["no-bos", "bos"])
def tiny_pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return model_pair(tmp_path_factory.mktemp("tiny_pair"), add_bos=request.param)


def _direct_perplexity(reference: Path, text: str, n_ctx: int, replace_bos: bool) -> tuple[float, float, int]:
    """Perplexity written out by hand: one chunk at a time, full logits, no quantmill code."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    tokenizer = Tokenizer.from_file(str(reference / "tokenizer.json"))
    ids = tokenizer.encode(text[:-1] if text.endswith("\n") else text, add_special_tokens=True).ids
    bos = json.loads((reference / "tokenizer_config.json").read_text())["add_bos_token"]
    bos_id = tokenizer.token_to_id(json.loads((reference / "tokenizer_config.json").read_text())["bos_token"])
    model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    nll: list[float] = []
    for c in range(len(ids) // n_ctx):
        chunk = list(ids[c * n_ctx : (c + 1) * n_ctx])
        if bos and replace_bos:
            chunk[0] = bos_id
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([chunk])).logits[0].double(), dim=-1)
        for pos in range(n_ctx // 2, n_ctx - 1):
            nll.append(-float(logp[pos, ids[c * n_ctx + pos + 1]]))
    values = np.array(nll)
    ppl = math.exp(values.mean())
    stderr = ppl * math.sqrt((np.mean(values**2) - values.mean() ** 2) / (len(values) - 1))
    return ppl, stderr, len(values)


def test_torch_matches_llamacpp_f32(tiny_pair: tuple[Path, Path], eval_txt: Path) -> None:
    gguf_path, reference = tiny_pair
    result = verify_artifacts([gguf_path], reference, eval_txt, N_CTX, OPTIONS)
    ref, gguf = result.results
    assert (ref.format, gguf.format) == ("hf", "gguf")
    assert ref.is_reference and not gguf.is_reference
    assert 1.5 < ref.ppl < 1e6
    assert gguf.ppl == pytest.approx(ref.ppl, rel=1e-4)
    assert gguf.ppl_stderr == pytest.approx(ref.ppl_stderr, rel=1e-3)
    assert abs(result.delta_ppl_pct(gguf)) < 0.01
    assert ref.bpw == 32.0 and gguf.bpw == 32.0

    # the distributions themselves agree, not just their average
    tokenizer = load_reference_tokenizer(reference)
    plan = prepare_tokens(eval_txt, tokenizer, N_CTX, max_chunks=2)
    with open_backend(reference, OPTIONS) as hf, open_backend(gguf_path, OPTIONS) as ll:
        for a, b in zip(hf.iter_logprobs(plan), ll.iter_logprobs(plan), strict=True):
            assert a.index == b.index and np.array_equal(a.targets, b.targets)
            assert a.logprobs.shape == b.logprobs.shape == (plan.n_scored, len(bpe_vocab().tokens))
            diff = np.abs(a.logprobs - b.logprobs)  # libllama keeps its KV cache in f16
            assert diff.mean() < 5e-4 and diff.max() < 1e-2


def test_chunking_matches_direct_computation(tiny_pair: tuple[Path, Path], eval_txt: Path) -> None:
    _, reference = tiny_pair
    text = eval_txt.read_text(encoding="utf-8")
    result = verify_artifacts([], reference, eval_txt, N_CTX, OPTIONS)
    ppl, stderr, count = _direct_perplexity(reference, text, N_CTX, replace_bos=True)
    (ref,) = result.results
    assert result.n_chunks == result.n_tokens // N_CTX >= 2
    assert (result.bos_id is not None) == json.loads((reference / "tokenizer_config.json").read_text())["add_bos_token"]
    assert ref.metrics["n_scored"] == count == result.n_chunks * (N_CTX // 2 - 1)
    assert ref.ppl == pytest.approx(ppl, rel=1e-5)
    assert ref.ppl_stderr == pytest.approx(stderr, rel=1e-4)
    if result.bos_id is not None:
        # replacing each chunk's first token by BOS is part of the method: without it the figure moves
        unreplaced, _, _ = _direct_perplexity(reference, text, N_CTX, replace_bos=False)
        assert abs(unreplaced / ref.ppl - 1) > 1e-4


def test_plan_chunks_math() -> None:
    tokens = np.arange(1000, dtype=np.int32)
    plan = plan_chunks(tokens, 128, source=Path("t.txt"), bos_id=7)
    assert plan.n_chunks == 7 and plan.first == 64 and plan.n_scored == 63
    first = plan.chunk_input(2)
    assert first[0] == 7 and np.array_equal(first[1:], tokens[257:384])
    assert np.array_equal(plan.chunk_targets(2), tokens[256 + 65 : 384])
    assert [g for g in plan.groups(3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert plan_chunks(tokens, 128, source=Path("t.txt"), bos_id=None, max_chunks=2).n_chunks == 2


def test_gguf_batching_does_not_change_figures(tiny_pair: tuple[Path, Path], eval_txt: Path) -> None:
    gguf_path, reference = tiny_pair
    tokenizer = load_reference_tokenizer(reference)
    plan = prepare_tokens(eval_txt, tokenizer, N_CTX)
    figures = []
    for per_call in (1, 5):  # 5 leaves a short last group
        metric = Perplexity()
        with open_backend(gguf_path, BackendOptions(threads=2, chunks_per_batch=per_call)) as backend:
            indices = []
            for chunk in backend.iter_logprobs(plan):
                indices.append(chunk.index)
                metric.update(chunk)
        assert indices == list(range(plan.n_chunks))
        figures.append(metric.result()["ppl"])
    assert figures[0] == pytest.approx(figures[1], rel=1e-5)


def test_perplexity_metric_uniform() -> None:
    metric = Perplexity()
    vocab = 50
    logprobs = np.full((10, vocab), -math.log(vocab), dtype=np.float32)
    metric.update(ChunkLogProbs(0, logprobs, np.arange(10, dtype=np.int32)))
    result = metric.result()
    assert result["ppl"] == pytest.approx(vocab, rel=1e-6) and result["ppl_stderr"] == pytest.approx(0.0, abs=1e-3)
    assert result["n_scored"] == 10


def test_cli_table_and_json(tiny_pair: tuple[Path, Path], eval_txt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gguf_path, reference = tiny_pair
    out = tmp_path / "report" / "verify.json"
    code = main(["verify", str(gguf_path), str(reference), "--reference", str(reference), "--text", str(eval_txt),
                 "--n-ctx", str(N_CTX), "--threads", "2", "--batch-chunks", "3", "--max-chunks", "5", "--json", str(out),
                 "--devices", "cpu"])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "| artifact | type |" in stdout and "tok/s |" in stdout and "| tiny-F32.gguf | F32 |" in stdout
    reference_row = next(line for line in stdout.splitlines() if line.startswith("| reference | F32 |"))
    assert reference_row.split("|")[10].strip() == "reference"  # its verdict cell
    report = json.loads(out.read_text())
    assert [p.name for p in out.parent.iterdir()] == ["verify.json"]
    assert report["passed"] is True and report["artifacts"][1]["verdict"] == "pass" and report["artifacts"][1]["passed"]
    assert "tokens_per_second" not in json.dumps(report)  # deterministic: timings stay out of the report
    assert report["artifacts"][1]["quant_type"] == "F32" and report["artifacts"][1]["kld_mean"] < 1e-3
    assert report["n_chunks"] == 5 and report["n_ctx"] == N_CTX
    records = report["artifacts"]
    assert [r["format"] for r in records] == ["hf", "gguf"], "the reference is measured once, first"
    for record in records:
        assert {"path", "format", "size_bytes", "bpw", "ppl", "ppl_stderr", "delta_ppl_pct"} <= record.keys()
        assert record["size_bytes"] > 0 and record["ppl"] > 1
    assert records[0]["delta_ppl_pct"] == 0.0
    assert records[1]["size_bytes"] == gguf_path.stat().st_size


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"  \n\n", "is empty"),
        (b"short text, far fewer tokens than two chunks", "fewer than two chunks"),
        (b"GGUF\x00\x00\x00\x03" + bytes(range(256)) * 8, "looks binary"),
        ("caf\u00e9 ".encode("latin-1") * 400, "not UTF-8"),
    ],
)
def test_bad_eval_text_exit_2(tiny_pair: tuple[Path, Path], tmp_path: Path, content: bytes, message: str,
                              capsys: pytest.CaptureFixture[str]) -> None:
    _, reference = tiny_pair
    text = tmp_path / "bad.txt"
    text.write_bytes(content)
    out = tmp_path / "out.json"
    assert main(["verify", "--reference", str(reference), "--text", str(text), "--n-ctx", str(N_CTX), "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(text) in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_artifacts_exit_2(tiny_pair: tuple[Path, Path], eval_txt: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    gguf_path, reference = tiny_pair
    base = ["--reference", str(reference), "--text", str(eval_txt), "--n-ctx", str(N_CTX)]
    assert main(["verify", str(tmp_path / "missing.gguf"), *base]) == 2
    assert "no such file" in capsys.readouterr().err
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 64)
    assert main(["verify", str(junk), *base]) == 2
    assert "not an artifact" in capsys.readouterr().err
    assert main(["verify", str(gguf_path), "--reference", str(tmp_path), "--text", str(eval_txt)]) == 2
    assert "tokenizer.json" in capsys.readouterr().err
    other = tmp_path / "other-vocab.gguf"
    write_tiny_gguf(other, spm_vocab(), tied=True)
    assert main(["verify", str(other), *base]) == 2
    err = capsys.readouterr().err
    assert str(other) in err and "vocabulary" in err


def test_reference_bos_policy(tiny_pair: tuple[Path, Path]) -> None:
    _, reference = tiny_pair
    tokenizer = load_reference_tokenizer(reference)
    config = json.loads((reference / "tokenizer_config.json").read_text())
    ids = tokenize_text("hello world", tokenizer)
    if config["add_bos_token"]:
        assert tokenizer.bos_id is not None and ids[0] == tokenizer.bos_id
    else:
        assert tokenizer.bos_id is None
        assert list(ids) == tokenizer.tokenizer.encode("hello world", add_special_tokens=False).ids


@pytest.mark.slow
def test_smollm2_reference_torch_vs_f16_gguf(tmp_path: Path) -> None:
    """The fp16 reference in torch and its f16 GGUF in libllama agree within 0.1% on real text."""
    if not GPL3.is_file():
        pytest.skip(f"{GPL3} is not present")
    from quantmill.convert.hf_to_gguf import convert_hf_to_gguf
    from quantmill.default_model import default_reference

    reference = default_reference()
    (f16,) = convert_hf_to_gguf(reference, "f16", tmp_path / "SmolLM2-F16.gguf", progress=False)
    result = verify_artifacts([f16], reference, GPL3, 256, BackendOptions(threads=2), max_chunks=4)
    ref, gguf = result.results
    assert 5 < ref.ppl < 100
    assert abs(result.delta_ppl_pct(gguf)) < 0.1
    assert 15.9 < gguf.bpw < 16.1


def test_a_reference_tokenizer_that_splits_differently_is_reported_and_fails(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    """verify scores on the reference's ids; when the GGUF's own tokenizer splits the text otherwise (here: a
    reference whose pre-tokenizer no longer splits digits one by one), the report says so and the artifact fails."""
    import shutil

    from quantmill.verify.backends.base import BackendOptions
    from quantmill.verify.evaluate import verify_artifacts
    from quantmill.verify.report import markdown_table

    gguf_path, reference = tiny_pair
    text = tmp_path / "numbers.txt"
    text.write_text(" ".join(f"item {i * 7919} costs {i * 31}.{i % 97} units" for i in range(600)) + "\n", encoding="utf-8")
    same = verify_artifacts([gguf_path], reference, text, 64, BackendOptions(threads=1), max_chunks=2)
    [artifact] = [r for r in same.results if not r.is_reference]
    assert artifact.tokenization is not None and artifact.tokenization.identical

    other = tmp_path / "other-reference"
    shutil.copytree(reference, other)
    tokenizer = json.loads((other / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    (other / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    result = verify_artifacts([gguf_path], other, text, 64, BackendOptions(threads=1), max_chunks=2)
    [artifact] = [r for r in result.results if not r.is_reference]
    check = artifact.tokenization
    assert check is not None and not check.identical and check.difference > 0.01, check
    assert any("own tokenizer splits the evaluation text differently" in f for f in artifact.failures)
    assert "its own tokenizer gives" in markdown_table(result)
