"""compressed-tensors export of GPTQ branches: the pack-quantized layout vLLM / llm-compressor use.

The branch is written from the same codes as the v1 branch of the same run; transformers +
compressed-tensors load it (no quantmill code on the loading side) and its logits match quantmill's
dequantized v1 model; its quantization_config validates against compressed-tensors' own pydantic model.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from quantmill.calib_data.loaders import CalibrationText
from quantmill.calib_data.sampling import CalibrationSet, load_tokenize, sample_sequences
from quantmill.quantize.gptq.branches import parse_branch, parse_branches
from quantmill.quantize.gptq.compressed_tensors import contiguous_groups, dequantize_compressed, pack_compressed
from quantmill.quantize.gptq.dequant import dequantized_tensors, gptq_size_figures, load_dequantized_model, read_gptq_config
from quantmill.quantize.gptq.engine import EngineOptions, quantize_branches
from quantmill.quantize.gptq.packing import dequantize_linear, pack_linear

compressed_tensors = pytest.importorskip("compressed_tensors")
TEXT = (Path(__file__).resolve().parents[2] / "calib_data" / "corpora" / "calib_as_you_like_it.txt").read_text(encoding="utf-8")
QUIET = EngineOptions(progress=False)
SPECS = ["4bit-32g-actorder", "8bit-none-actorder", "4bit-64g-actorder-static"]


@pytest.fixture(scope="module")
def branches(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> tuple[Path, CalibrationSet]:
    """One run: every spec in both formats (v1 and compressed-tensors) side by side."""
    from conftest import build_tiny_llama

    tmp = tmp_path_factory.mktemp("ct")
    tiny = build_tiny_llama(tmp / "tiny", smollm2_tokenizer_dir, 49152, dtype="float16", num_hidden_layers=2,
                            tie_word_embeddings=False)
    calib = sample_sequences(CalibrationText("ayli", (TEXT,)), load_tokenize(tiny), samples=4, seqlen=48, seed=3)
    specs = parse_branches(SPECS + [s + "-ct" for s in SPECS])
    quantize_branches(tiny, calib, specs, tmp / "out", QUIET)
    return tmp / "out", calib


def _names(spec: str) -> tuple[str, str]:
    return parse_branch(spec).name, parse_branch(spec + "-ct").name


def test_spec_names_and_parsing() -> None:
    ct = parse_branch("4bit-32g-actorder-ct")
    assert ct.format == "compressed-tensors" and ct.name == "gptq-4bit-32g-actorder_True-compressed-tensors"
    assert parse_branch(ct.name) == ct and parse_branch(ct.short) == ct
    assert parse_branch("4bit-32g-actorder", format="compressed-tensors") == ct
    assert parse_branch("4bit-32g-actorder").format == "gptq"


@pytest.mark.parametrize("bits,group,sym,act", [(4, 32, True, True), (8, 0, True, False), (3, 32, False, True),
                                                (4, 64, False, False), (2, 32, True, True)])
def test_pack_matches_the_v1_dequantization(bits: int, group: int, sym: bool, act: bool) -> None:
    rng = np.random.default_rng(bits * 7 + group)
    out_f, in_f = 64, 128
    groups = in_f // group if group else 1
    maxq = (1 << bits) - 1
    codes = rng.integers(0, maxq + 1, size=(out_f, in_f))
    scales = rng.uniform(0.01, 0.1, size=(groups, out_f)).astype(np.float16).astype(np.float32)
    zeros = (np.full((groups, out_f), 1 << (bits - 1)) if sym else rng.integers(1, maxq + 1, size=(groups, out_f)))
    order = rng.permutation(in_f) if act else np.arange(in_f)
    g_idx = np.empty(in_f, dtype=np.int64)
    g_idx[order] = np.arange(in_f) // (in_f // groups)  # groups follow the activation order
    ct = pack_compressed(codes, scales, zeros, g_idx, bits, sym=sym)
    assert (ct.weight_g_idx is None) == contiguous_groups(g_idx, groups)
    assert (ct.weight_zero_point is None) == sym
    expected = dequantize_linear(pack_linear(codes, scales, zeros, g_idx, bits))
    np.testing.assert_array_equal(dequantize_compressed(ct, sym), expected)
    # compressed-tensors' own unpacking reads the same codes
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    signed = unpack_from_int32(torch.from_numpy(ct.weight_packed), bits, torch.Size([out_f, in_f]))
    np.testing.assert_array_equal(signed.numpy().astype(np.int64) + (1 << (bits - 1)), codes)
    if not sym:
        zp = unpack_from_int32(torch.from_numpy(ct.weight_zero_point), bits, torch.Size([out_f, groups]), packed_dim=0)
        np.testing.assert_array_equal(zp.numpy().astype(np.int64) + (1 << (bits - 1)), zeros.T)


@pytest.mark.parametrize("spec", SPECS)
def test_config_validates_against_compressed_tensors(branches: tuple[Path, CalibrationSet], spec: str) -> None:
    from compressed_tensors.quantization import QuantizationConfig

    out, _ = branches
    _, ct_name = _names(spec)
    qconfig = json.loads((out / ct_name / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qconfig)
    assert parsed.format == "pack-quantized" and parsed.quantization_status == "compressed"
    weights = parsed.config_groups["group_0"].weights
    branch = parse_branch(spec)
    assert weights.num_bits == branch.bits and weights.symmetric == branch.sym
    assert weights.actorder == ("group" if branch.desc_act and not branch.static_groups and branch.group_size != -1
                                else "weight" if branch.desc_act else None)
    assert not (out / ct_name / "quantize_config.json").exists()
    assert read_gptq_config(out / ct_name)["bits"] == branch.bits


@pytest.mark.parametrize("spec", SPECS)
def test_same_codes_as_the_v1_branch(branches: tuple[Path, CalibrationSet], spec: str) -> None:
    """No second quantization: both formats dequantize to identical weights."""
    out, _ = branches
    v1_name, ct_name = _names(spec)
    v1 = dict(dequantized_tensors(out / v1_name))
    ct = dict(dequantized_tensors(out / ct_name))
    assert sorted(v1) == sorted(ct)
    for name in v1:
        np.testing.assert_array_equal(v1[name], ct[name], err_msg=name)
    assert gptq_size_figures(out / ct_name)[2] == gptq_size_figures(out / v1_name)[2]  # same weight count for verify


@pytest.mark.parametrize("spec", SPECS)
def test_transformers_loads_the_branch_with_matching_logits(branches: tuple[Path, CalibrationSet], spec: str) -> None:
    from transformers import AutoModelForCausalLM

    out, calib = branches
    v1_name, ct_name = _names(spec)
    ids = torch.from_numpy(calib.token_ids[:2].astype(np.int64))
    model = AutoModelForCausalLM.from_pretrained(out / ct_name, dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert any("weight_packed" in n or hasattr(m, "quantization_scheme") for n, m in model.named_modules())
    reference = load_dequantized_model(out / v1_name)
    with torch.no_grad():
        got = model(ids).logits.float()
        ref = reference(ids).logits
    error = float((got - ref).norm() / ref.norm())
    print(f"{ct_name}: relative logit error {error:.2e}")
    assert error < 1e-3, f"{ct_name}: relative logit error {error:.2e}"


def test_cli_format_flag_recipe_field_and_verify_detection(make_tiny_llama, tmp_path: Path, capsys) -> None:
    from quantmill.cli import main
    from quantmill.quantize.gptq.dequant import is_gptq_checkpoint
    from quantmill.recipe import GptqBranch

    tiny = make_tiny_llama("bpe", name="tinycli", dtype="float16", num_hidden_layers=1)
    text = tmp_path / "calib.txt"
    text.write_text(TEXT[:20000], encoding="utf-8")
    out = tmp_path / "out"
    assert main(["quantize", "gptq", str(tiny), "--out", str(out), "--calib", str(text), "--calib-samples", "2",
                 "--calib-seqlen", "32", "--no-progress", "--format", "compressed-tensors", "--device", "cpu",
                 "--branch", "4bit-32g-actorder", "--branch", "8bit-none"]) == 0
    assert "compressed-tensors" in capsys.readouterr().out
    for name in ("gptq-4bit-32g-actorder_True-compressed-tensors", "gptq-8bit--1g-actorder_False-compressed-tensors"):
        config = json.loads((out / name / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "compressed-tensors"
        assert is_gptq_checkpoint(out / name)  # verify scores it like a v1 branch
    # a re-run into the same --out is allowed (the branches are quantmill's own)
    assert main(["quantize", "gptq", str(tiny), "--out", str(out), "--calib", str(text), "--calib-samples", "2",
                 "--calib-seqlen", "32", "--no-progress", "--branch", "8bit-none-ct"]) == 0
    branch = GptqBranch(bits=4, group_size=32, format="compressed-tensors")
    assert branch.spec().format == "compressed-tensors" and branch.spec().name.endswith("-compressed-tensors")
    assert GptqBranch(bits=4).spec().format == "gptq"
    with pytest.raises(ValueError):
        GptqBranch(bits=4, format="awq")
