"""Bundled corpora, calibration loaders and seeded sampling."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from quantmill.calib_data.bundled import CORPORA_DIR, calibration_files, eval_file
from quantmill.calib_data.loaders import LOADERS, CalibrationText, load_calibration_text, load_file
from quantmill.calib_data.overlap import shared_lines, shared_windows
from quantmill.calib_data.sampling import (
    CalibrationSet,
    load_calibration_set,
    load_tokenize,
    sample_from_stream,
    sample_sequences,
    save_calibration_set,
    token_sha256,
)
from quantmill.errors import InputFileError, UnsupportedError, UserInputError

SOURCES_MD = CORPORA_DIR.parent / "SOURCES.md"


# --------------------------------------------------------------------------- bundled corpora


def test_bundled_files_are_listed_with_a_licence() -> None:
    sources = SOURCES_MD.read_text(encoding="utf-8")
    files = calibration_files()
    assert len(files) >= 5
    for path in [*files, eval_file()]:
        if path != eval_file():
            row = next(line for line in sources.splitlines() if f"`{path.name}`" in line)
            assert re.search(r"public domain|PSF License", row), row
        text = path.read_text(encoding="utf-8")
        assert "\r" not in text and text.endswith("\n")
    total = sum(path.stat().st_size for path in CORPORA_DIR.iterdir())
    assert total < 4_000_000  # a few MB at most


def test_calibration_set_mixes_kinds_and_excludes_gpl3() -> None:
    texts = {p.name: p.read_text(encoding="utf-8") for p in calibration_files()}
    joined = "\n".join(texts.values())
    assert "GNU GENERAL PUBLIC LICENSE" not in joined
    assert "ROSALIND" in texts["calib_as_you_like_it.txt"]  # dialogue
    assert "In the beginning God created" in texts["calib_kjv_bible.txt"]  # prose
    assert "def " in texts["calib_python_code.txt"] and "class " in texts["calib_python_code.txt"]  # code
    assert ".. code-block::" in texts["calib_python_docs.txt"] or ">>> " in texts["calib_python_docs.txt"]  # technical


def test_eval_text_never_overlaps_calibration() -> None:
    calibration = [p.read_text(encoding="utf-8") for p in calibration_files()]
    evaluation = eval_file().read_text(encoding="utf-8")
    assert len(evaluation) > 150_000
    assert shared_windows(evaluation, calibration) == []
    assert shared_lines(evaluation, calibration) == []


def test_overlap_checks_find_what_they_should() -> None:
    a = "x" * 10 + "The quick brown fox jumps over the lazy dog while the cat watches it all." + "y" * 10
    b = "zz The quick brown fox jumps over the lazy dog while the cat watches it all. zz"
    sentence = len("The quick brown fox jumps over the lazy dog while the cat watches it all.")
    assert shared_windows(a, [b]) == list(range(10, 10 + sentence - 64 + 1))
    assert shared_windows(a, ["The quick brown fox jumps over the lazy dog, while the cat watches it all."]) == []
    assert shared_lines("a long enough line to be non-trivial\n-------------------------\nok", ["a long enough line to be non-trivial", "-------------------------"]) == [
        "a long enough line to be non-trivial"
    ]


@pytest.mark.slow
def test_bundled_calibration_has_300k_smollm2_tokens() -> None:
    from quantmill.default_model import default_reference

    tokenize = load_tokenize(default_reference())
    counts = {p.name: len(tokenize(p.read_text(encoding="utf-8"))) for p in calibration_files()}
    assert sum(counts.values()) >= 300_000, counts
    assert min(counts.values()) >= 30_000, counts  # every kind is a real share


# --------------------------------------------------------------------------- loaders


def test_registry_covers_the_documented_suffixes() -> None:
    assert sorted(LOADERS) == [".jsonl", ".parquet", ".txt"]


def test_txt_jsonl_and_bundled(tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("\ufeffHello there.\n", encoding="utf-8")
    assert load_file(txt) == ["Hello there.\n"]
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"text": "  "}\n{"body": "x", "text": "two"}\n', encoding="utf-8")
    assert load_file(jsonl) == ["one", "two"]
    other = tmp_path / "c.jsonl"
    other.write_text('{"content": "alpha"}\n', encoding="utf-8")
    assert load_calibration_text(other, text_field="content") == CalibrationText(str(other), ("alpha",))
    bundled = load_calibration_text("bundled")
    assert bundled.name == "bundled" and len(bundled.documents) == len(calibration_files())


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("empty.txt", b"\n \n", "is empty"),
        ("bin.txt", b"PK\x03\x04\x00\x00binary", "binary"),
        ("latin1.txt", "caf\u00e9".encode("latin-1"), "not UTF-8"),
        ("bad.jsonl", b'{"text": "ok"}\n{not json\n', "line 2 is not valid JSON"),
        ("field.jsonl", b'{"body": "x"}\n', "no field 'text'"),
        ("type.jsonl", b'{"text": 5}\n', "is not a string"),
        ("blank.jsonl", b'{"text": ""}\n', "no non-empty"),
    ],
)
def test_bad_files_name_the_file(tmp_path: Path, name: str, content: bytes, needle: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputFileError) as info:
        load_calibration_text(path)
    message = str(info.value)
    assert needle in message and str(path) in message and "\n" not in message
    assert info.value.exit_code == 2


def test_missing_directory_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="no such file"):
        load_calibration_text(tmp_path / "nope.txt")
    with pytest.raises(InputFileError, match="is a directory"):
        load_calibration_text(tmp_path)
    (tmp_path / "x.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(UnsupportedError, match=r"x\.csv: unsupported calibration file type '\.csv'"):
        load_calibration_text(tmp_path / "x.csv")


def test_parquet(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1")
        with pytest.raises(UnsupportedError, match="pip install pyarrow"):
            load_calibration_text(path)
        return
    pq.write_table(pa.table({"text": ["first doc", None, "second doc"], "n": [1, 2, 3]}), path)
    assert load_calibration_text(path).documents == ("first doc", "second doc")
    with pytest.raises(InputFileError, match="no column 'body'"):
        load_calibration_text(path, text_field="body")


def _fake_hub_cache(root: Path, repo: str, files: dict[str, str]) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / f"datasets--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit, encoding="utf-8")
    for rel, text in files.items():
        target = repo_dir / "snapshots" / commit / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")


def test_hub_dataset_from_local_cache_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _fake_hub_cache(
        tmp_path,
        "someone/corpus",
        {
            "data/train.jsonl": json.dumps({"text": "train text"}) + "\n",
            "data/test.jsonl": json.dumps({"text": "test text"}) + "\n",
            "README.md": "# card\n",
        },
    )
    both = load_calibration_text("hub:someone/corpus")
    assert both.name == "hub:someone/corpus" and both.documents == ("test text", "train text")
    assert load_calibration_text("hub:someone/corpus:train").documents == ("train text",)
    with pytest.raises(InputFileError, match="no .* files for split 'validation'"):
        load_calibration_text("hub:someone/corpus:validation")
    with pytest.raises(UserInputError, match="not in the local Hugging Face cache"):
        load_calibration_text("hub:someone/absent")
    with pytest.raises(UserInputError, match="expected hub:OWNER/NAME"):
        load_calibration_text("hub:justaname")


# --------------------------------------------------------------------------- sampling


def _char_tokenize(text: str) -> list[int]:
    return [ord(c) % 50_000 for c in text]


def test_sampling_is_seeded_disjoint_and_hashed() -> None:
    stream = np.arange(10_000, dtype=np.int32)
    a = sample_from_stream(stream, "s", samples=8, seqlen=100, seed=7)
    b = sample_from_stream(stream, "s", samples=8, seqlen=100, seed=7)
    c = sample_from_stream(stream, "s", samples=8, seqlen=100, seed=8)
    assert a.token_ids.shape == (8, 100) and a.token_ids.dtype == np.int32
    assert np.array_equal(a.token_ids, b.token_ids) and a.sha256 == b.sha256
    assert a.sha256 != c.sha256
    starts = a.token_ids[:, 0]
    assert np.all(starts % 100 == 0) and len(set(starts.tolist())) == 8 and np.all(np.diff(starts) > 0)
    assert np.array_equal(a.token_ids, starts[:, None] + np.arange(100))
    assert a.sha256 == hashlib.sha256(a.token_ids.astype("<i4").tobytes()).hexdigest()
    assert a.record() == {"source": "s", "samples": 8, "seqlen": 100, "seed": 7, "token_sha256": a.sha256, "corpus_tokens": 10_000}


def test_token_sha256_is_int32_little_endian() -> None:
    ids = np.array([[1, 256], [65536, 2]], dtype=np.int64)
    raw = b"".join(int(v).to_bytes(4, "little") for v in [1, 256, 65536, 2])
    assert token_sha256(ids) == hashlib.sha256(raw).hexdigest()


def test_documents_join_with_a_separator_and_short_text_is_an_error(tmp_path: Path) -> None:
    text = CalibrationText("two", ("ab", "cd"))
    calib = sample_sequences(text, _char_tokenize, samples=1, seqlen=6, seed=0)
    assert "".join(map(chr, calib.token_ids[0])) == "ab\n\ncd"
    path = tmp_path / "small.txt"
    path.write_text("just a little text", encoding="utf-8")
    with pytest.raises(UserInputError) as info:
        sample_sequences(load_calibration_text(path), _char_tokenize, samples=4, seqlen=16, seed=0)
    assert str(path) in str(info.value) and "enough for 1 sequences of 16 but 4 were requested" in str(info.value)
    with pytest.raises(UserInputError, match="--calib-samples 0"):
        sample_sequences(text, _char_tokenize, samples=0, seqlen=6, seed=0)


def test_calibration_set_save_and_load(tmp_path: Path) -> None:
    calib = sample_from_stream(np.arange(500, dtype=np.int32), "x", samples=3, seqlen=50, seed=1)
    save_calibration_set(calib, tmp_path / "calib")
    back = load_calibration_set(tmp_path / "calib")
    assert isinstance(back, CalibrationSet) and back.sha256 == calib.sha256 and back.record() == calib.record()
    np.save(tmp_path / "calib.npy", calib.token_ids + 1)
    with pytest.raises(InputFileError, match="do not match their recorded sha256"):
        load_calibration_set(tmp_path / "calib")


def test_real_tokenizer_sampling_is_stable(tiny_bpe_llama: Path) -> None:
    tokenize = load_tokenize(tiny_bpe_llama)
    text = load_calibration_text("bundled")
    first = sample_sequences(text, tokenize, samples=16, seqlen=256, seed=0)
    again = sample_sequences(text, tokenize, samples=16, seqlen=256, seed=0)
    assert first.sha256 == again.sha256
    assert first.corpus_tokens >= 300_000  # the bundled corpus in SmolLM2 tokens
    assert int(first.token_ids.max()) < 49152


def test_generated_sequences_are_seeded_and_start_with_ordinary_tokens(tiny_bpe_llama: Path) -> None:
    from quantmill.calib_data.generated import generate_sequences, special_token_ids

    a = generate_sequences(tiny_bpe_llama, samples=3, seqlen=12, seed=5, batch_size=2, progress=False)
    b = generate_sequences(tiny_bpe_llama, samples=3, seqlen=12, seed=5, batch_size=2, progress=False)
    c = generate_sequences(tiny_bpe_llama, samples=3, seqlen=12, seed=6, batch_size=2, progress=False)
    assert a.token_ids.shape == (3, 12) and a.source.startswith("generated")
    assert a.sha256 == b.sha256 and np.array_equal(a.token_ids, b.token_ids)
    assert a.sha256 != c.sha256 and not np.array_equal(a.token_ids[:, 0], c.token_ids[:, 0])
    special = special_token_ids(tiny_bpe_llama)
    assert special and not set(a.token_ids[:, 0].tolist()) & special
    assert int(a.token_ids.max()) < 49152
