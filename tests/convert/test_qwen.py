"""Qwen2 / Qwen2.5 and Qwen3 → GGUF: tiny random transformers models run in llama.cpp as in transformers,
convert byte for byte as llama.cpp's own converter does, and quantize through libllama."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from conftest import TINY_DEFAULTS, transformers_logits
from test_rope_bake import llama_cpp_logits, max_rel_err

from quantmill.convert.hf_to_gguf import convert_hf_to_gguf
from quantmill.errors import InputFileError, UnsupportedError

TOKENS = [(37 * i + 11) % 1000 for i in range(96)]
REL = 2e-5  # f32 weights, f32 KV cache in llama.cpp: measured about 1e-6
FAMILIES = ("qwen2", "qwen3")
TINY: dict[str, Any] = {**TINY_DEFAULTS, "rms_norm_eps": 1e-6}
# Qwen3's head_dim is its own field (transformers' default 128); 32 ≠ hidden / heads tests key_length.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {"qwen2": {}, "qwen3": {"head_dim": 32}}


def build_tiny_qwen(out: Path, tokenizer_dir: Path, family: str, seed: int = 0, **overrides: Any) -> Path:
    """A random tiny Qwen2 / Qwen3 checkpoint saved by transformers, with SmolLM2's tokenizer files."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[family]
    torch.manual_seed(seed)
    config = config_cls(vocab_size=49152, **{**TINY, **FAMILY_DEFAULTS[family], **overrides})
    model = model_cls(config).eval()
    if family == "qwen2":
        with torch.no_grad():  # transformers initialises the q/k/v biases to zero; make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.5)
    else:
        with torch.no_grad():  # and the q/k norms to one
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
                layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(out)
    for path in sorted(tokenizer_dir.iterdir()):
        shutil.copy(path, out / path.name)
    return out


def fields(path: Path) -> dict[str, Any]:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_matches_transformers(family: str, tied: bool, smollm2_tokenizer_dir: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    model = build_tiny_qwen(tmp_path / "hf", smollm2_tokenizer_dir, family, tie_word_embeddings=tied)
    [out] = convert_hf_to_gguf(model, "f32", tmp_path / "m.gguf", progress=False)
    kv = fields(out)
    assert kv["general.architecture"] == family
    assert (kv[f"{family}.attention.head_count"], kv[f"{family}.attention.head_count_kv"]) == (4, 2)
    assert kv[f"{family}.context_length"] == 2048 and kv[f"{family}.rope.freq_base"] == 10000.0
    assert f"{family}.rope.dimension_count" not in kv and f"{family}.vocab_size" not in kv
    if family == "qwen3":
        assert (kv["qwen3.attention.key_length"], kv["qwen3.attention.value_length"]) == (32, 32)
    assert "tokenizer.ggml.add_space_prefix" not in kv

    # Tensors are the checkpoint's, unpermuted (NEOX RoPE): biases for Qwen2, q/k norms for Qwen3.
    weights = load_file(str(model / "model.safetensors"))
    tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(out).tensors}
    assert ("output.weight" in tensors) == (not tied)
    for i in range(2):
        for ours, theirs in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj")):
            assert np.array_equal(tensors[f"blk.{i}.{ours}.weight"], weights[f"model.layers.{i}.self_attn.{theirs}.weight"])
            assert (f"blk.{i}.{ours}.bias" in tensors) == (family == "qwen2")
            if family == "qwen2":
                assert np.array_equal(tensors[f"blk.{i}.{ours}.bias"], weights[f"model.layers.{i}.self_attn.{theirs}.bias"])
        for norm in ("q_norm", "k_norm"):
            assert (f"blk.{i}.attn_{norm}.weight" in tensors) == (family == "qwen3")
    want = {"qwen2": 2 * 12 + 2, "qwen3": 2 * 11 + 2}[family] + (0 if tied else 1)
    assert len(tensors) == want

    hf = transformers_logits(model, TOKENS)
    assert np.abs(hf).max() > 0.1
    err = max_rel_err(llama_cpp_logits(out, TOKENS), hf)
    assert err <= REL, f"{family} tied={tied}: llama.cpp vs transformers max rel err {err:.3g}"


@pytest.mark.parametrize("family", FAMILIES)
def test_yarn_rope_matches_transformers(family: str, smollm2_tokenizer_dir: Path, tmp_path: Path) -> None:
    """Qwen2.5's long-context recipe: YaRN factor 4 over the original context, past the original context."""
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0}
    model = build_tiny_qwen(tmp_path / "hf", smollm2_tokenizer_dir, family, rope_parameters=rope)
    [out] = convert_hf_to_gguf(model, "f32", tmp_path / "m.gguf", progress=False)
    kv = fields(out)
    assert kv[f"{family}.rope.scaling.type"] == "yarn" and kv[f"{family}.rope.scaling.factor"] == 4.0
    assert kv[f"{family}.rope.scaling.original_context_length"] == 32
    hf = transformers_logits(model, TOKENS)
    err = max_rel_err(llama_cpp_logits(out, TOKENS), hf)
    assert err <= REL, f"{family} yarn: llama.cpp vs transformers max rel err {err:.3g}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("file_type", ["Q8_0", "Q4_K_M"])
def test_quantize_and_load(family: str, file_type: str, smollm2_tokenizer_dir: Path, tmp_path: Path) -> None:
    """Hidden 256 / intermediate 512: every matrix row is whole K-quant blocks, so Q4_K_M really is K-quants."""
    from quantmill.quantize.gguf.libllama import quantize_gguf

    overrides: dict[str, Any] = {"hidden_size": 256, "intermediate_size": 512}
    if family == "qwen3":
        overrides["head_dim"] = 64
    model = build_tiny_qwen(tmp_path / "hf", smollm2_tokenizer_dir, family, tie_word_embeddings=False, **overrides)
    [f32] = convert_hf_to_gguf(model, "f32", tmp_path / "m-f32.gguf", progress=False)
    result = quantize_gguf(f32, file_type, tmp_path / f"m-{file_type}.gguf", threads=2)
    types = result.summary.tensor_types()
    assert result.fallbacks == ()
    if file_type == "Q4_K_M":
        assert types["blk.0.attn_q.weight"] == "Q4_K" and types["blk.0.ffn_gate.weight"] == "Q4_K"
        assert {types["blk.0.ffn_down.weight"], types["output.weight"]} <= {"Q4_K", "Q6_K"}
    else:
        assert types["blk.0.attn_q.weight"] == "Q8_0"
    assert all(t == "F32" for name, t in types.items() if name.endswith(("norm.weight", ".bias")))

    # The quantized file holds the same model: transformers on its dequantized weights agrees with llama.cpp up to
    # llama.cpp's own activation quantization (Q8_0 / Q8_K inputs to the matmuls; measured 2-4% of the largest logit
    # in these high-gain random models, where against the float weights Q4_K_M is off by 50%).
    got = llama_cpp_logits(result.output, TOKENS[:32])
    assert np.isfinite(got).all()
    ref = dequantized_transformers_logits(model, result.output, family, TOKENS[:32])
    err = max_rel_err(got, ref)
    assert err < 0.1, f"{family} {file_type}: llama.cpp vs transformers on the dequantized weights: {err:.3g}"
    if file_type == "Q8_0":
        assert max_rel_err(got, transformers_logits(model, TOKENS[:32])) < 0.1


def dequantized_transformers_logits(model_dir: Path, path: Path, family: str, tokens: list[int]) -> np.ndarray:
    """transformers' logits with every weight replaced by the GGUF's, dequantized (names mapped back by gguf-py)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    arch = {"qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}[family]
    name_map = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    hf_name = {name_map.get_name(k, try_suffixes=(".weight", ".bias")): k for k in model.state_dict()}
    state = {}
    for t in gguf.GGUFReader(path).tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        state[hf_name[t.name]] = torch.from_numpy(values.reshape([int(n) for n in reversed(t.shape)]))
    result = model.load_state_dict(state, strict=False)
    assert not result.missing_keys and not result.unexpected_keys, result
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double().numpy()


def _config_with(model_dir: Path, **changes: Any) -> Path:
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    for key, value in changes.items():
        if value is None:
            config.pop(key)
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> dict[str, Path]:
    return {f: build_tiny_qwen(tmp_path_factory.mktemp(f), smollm2_tokenizer_dir, f) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"num_key_value_heads": 3}, InputFileError, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
        ({"hidden_size": 0}, InputFileError, "field 'hidden_size' is 0, expected an integer in [1, 65536]"),
        ({"num_attention_heads": "4"}, InputFileError, "field 'num_attention_heads' is '4', expected an integer in"),
        ({"num_hidden_layers": None}, InputFileError, "field 'num_hidden_layers' is None, expected a positive integer"),
        ({"vocab_size": -1}, InputFileError, "field 'vocab_size' is -1, expected an integer in"),
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}}, UnsupportedError,
         "RoPE type 'llama3' is not supported for"),
        ({"rope_parameters": {"rope_type": "wavy", "rope_theta": 1e4}}, UnsupportedError, "RoPE type 'wavy' is not supported"),
    ],
)
def test_bad_config_is_one_line_error(
    family: str, changes: dict[str, Any], error: type[Exception], message: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    model = tmp_path / "bad"
    shutil.copytree(tiny_models[family], model)
    _config_with(model, **changes)
    with pytest.raises(error) as info:
        convert_hf_to_gguf(model, "f16", tmp_path / "out.gguf", progress=False)
    text = str(info.value)
    assert message in text and "\n" not in text and "config.json" in text
    assert not (tmp_path / "out.gguf").exists()


def test_qwen2_head_dim_must_fill_hidden(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = tmp_path / "bad"
    shutil.copytree(tiny_models["qwen2"], model)
    _config_with(model, head_dim=32)
    with pytest.raises(UnsupportedError, match="heads × head_dim = hidden_size"):
        convert_hf_to_gguf(model, "f16", tmp_path / "out.gguf", progress=False)


def test_qwen3_without_qk_norms_is_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    model = tmp_path / "bad"
    shutil.copytree(tiny_models["qwen3"], model)
    weights = load_file(str(model / "model.safetensors"))
    del weights["model.layers.1.self_attn.k_norm.weight"]
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InputFileError, match="model.layers.1.self_attn.k_norm.weight"):
        convert_hf_to_gguf(model, "f16", tmp_path / "out.gguf", progress=False)


# transformers 5 loads every qwen2/qwen3 directory's tokenizer as Qwen2Tokenizer, which replaces tokenizer.json's
# pre-tokenizer with Qwen's regex; llama.cpp's converter hashes that, and SmolLM2's vocabulary under Qwen's regex is
# no pre-tokenizer it knows. Its converter runs with that one answer supplied (quantmill's, from tokenizer.json):
# everything else (hyper-parameters, tensors, the rest of the vocabulary) is llama.cpp's own.
LLAMA_CPP_WRAPPER = """
import runpy, sys
script, pre = sys.argv[1], sys.argv[2]
sys.path.insert(0, str(__import__("pathlib").Path(script).parent))
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
"""


def check_against_llama_cpp(model_dir: Path, outtype: str, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from test_converter_parity import LLAMA_CPP_DIR, SCRIPT, assert_same_gguf

    if not SCRIPT.is_file():
        pytest.skip(f"llama.cpp's converter not found at {SCRIPT}; set QUANTMILL_LLAMA_CPP_DIR")
    [ours] = convert_hf_to_gguf(model_dir, outtype, tmp_path / "quantmill.gguf", progress=False)
    pre = fields(ours)["tokenizer.ggml.pre"]
    wrapper = tmp_path / "llama_cpp_convert.py"
    wrapper.write_text(LLAMA_CPP_WRAPPER)
    reference = tmp_path / "llama_cpp.gguf"
    env = {**os.environ, "PYTHONPATH": str(LLAMA_CPP_DIR / "gguf-py")}
    cmd = [sys.executable, str(wrapper), str(SCRIPT), pre, str(model_dir), "--outtype", outtype, "--outfile", str(reference)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_gguf(reference, ours)


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_llama_cpp_converter(family: str, tied: bool, outtype: str, smollm2_tokenizer_dir: Path, tmp_path: Path) -> None:
    model = build_tiny_qwen(tmp_path / f"tiny-{family}", smollm2_tokenizer_dir, family, tie_word_embeddings=tied)
    check_against_llama_cpp(model, outtype, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_legacy_yarn_config_matches_llama_cpp_converter(family: str, smollm2_tokenizer_dir: Path, tmp_path: Path) -> None:
    """A Qwen2.5-style config.json: legacy ``rope_scaling`` (type yarn) + top-level ``rope_theta``, defaults left out."""
    model = build_tiny_qwen(tmp_path / f"tiny-{family}", smollm2_tokenizer_dir, family)
    _config_with(model, rope_parameters=None, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
                 rope_theta=1000000.0, max_position_embeddings=None, use_sliding_window=False, sliding_window=131072)
    check_against_llama_cpp(model, "f16", tmp_path)
