"""LCKV checkpoints: the reference forward against a straightforward per-layer implementation, the GGUF keys,
merge → bake → GPTQ → verify with the layout intact, and bad layouts refused."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import build_tiny_llama
from lckv_helpers import W2_LAYER_TYPES, build_tiny_lckv, lckv_fields, naive_lckv_logits
from merge_helpers import peft_merge, train_adapter

from quantmill.cli import main
from quantmill.convert.hf_to_gguf import convert_hf_to_gguf
from quantmill.convert.lckv.model import LckvForCausalLM
from quantmill.errors import InputFileError

TOKENS = [(37 * i + 11) % 1000 for i in range(24)]
CORPUS = Path(__file__).resolve().parents[2] / "calib_data" / "corpora" / "calib_as_you_like_it.txt"
LAYOUTS = {
    "w2": (W2_LAYER_TYPES, {}),  # layers 1..4 use layer 4's KV: 1..3 see it one token late
    "sliding-nodiag": ("0_0_4s_4_4s_5", {"sliding_window": 5, "force_nodiag": True}),
    "no-cycle": ("0_0_2_2_4s_4", {"sliding_window": 3}),  # cross-layer sharing downwards only
}


def reference_logits(model_dir: Path, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return LckvForCausalLM.from_checkpoint(model_dir)(torch.tensor([tokens]))[0].double().numpy()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_reference_forward_matches_per_layer_implementation(layout: str, sentencepiece_tokenizer_dir: Path, tmp_path: Path) -> None:
    layer_types, extra = LAYOUTS[layout]
    model = build_tiny_lckv(tmp_path / layout, sentencepiece_tokenizer_dir, layer_types, lckv=extra)
    want = naive_lckv_logits(model, TOKENS)
    got = reference_logits(model, TOKENS)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), np.abs(got - want).max()  # measured 1e-6
    # The layout matters: masking the diagonal everywhere gives other logits.
    config = json.loads((model / "config.json").read_text())
    if not config["force_nodiag"]:
        config["force_nodiag"] = True
        (model / "config.json").write_text(json.dumps(config))
        assert np.abs(naive_lckv_logits(model, TOKENS) - want).max() > 1e-2


def test_gguf_carries_the_layout(sentencepiece_tokenizer_dir: Path, tmp_path: Path) -> None:
    layer_types, extra = LAYOUTS["sliding-nodiag"]
    model = build_tiny_lckv(tmp_path / "m", sentencepiece_tokenizer_dir, layer_types, lckv=extra)
    [out] = convert_hf_to_gguf(model, "f16", tmp_path / "m.gguf", progress=False)
    reader = gguf.GGUFReader(out)
    keys = {k: f.contents() for k, f in reader.fields.items() if k.startswith("lckv.")}
    assert keys == {
        "lckv.layer_types": "0_0_4s_4_4s_5",
        "lckv.kv_source": [0, 0, 4, 4, 4, 5],
        "lckv.sliding_window_layers": [False, False, True, False, True, False],
        "lckv.sliding_window": 5,
        "lckv.forward_passes": 7,
        "lckv.backward_passes": 2,
        "lckv.use_sequential": False,
        "lckv.force_nodiag": True,
        "lckv.config": json.dumps(lckv_fields(model), sort_keys=True),
    }
    assert reader.fields["lckv.kv_source"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32]
    assert json.loads(keys["lckv.config"]) == lckv_fields(model)
    kv_tensors = sorted(t.name for t in reader.tensors if ".attn_k." in t.name or ".attn_v." in t.name)
    assert kv_tensors == [f"blk.{i}.attn_{p}.weight" for i in (0, 4, 5) for p in ("k", "v")]
    assert reader.fields["general.architecture"].contents() == "llama"


def _rtn(weight: torch.Tensor, group: int = 32, bits: int = 4) -> torch.Tensor:
    """Round-to-nearest on GPTQ's asymmetric grid: the baseline GPTQ must beat."""
    w = weight.reshape(weight.shape[0], -1, group)
    lo, hi = w.amin(-1, keepdim=True).clamp(max=0), w.amax(-1, keepdim=True).clamp(min=0)
    scale = (hi - lo).clamp(min=1e-8) / (2**bits - 1)
    zero = torch.round(-lo / scale)
    return ((torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1) - zero) * scale).reshape(weight.shape)


@pytest.mark.slow
def test_w2_model_merge_bake_gptq_verify_keeps_the_layout(smollm2_tokenizer_dir: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    from quantmill.quantize.calibrate import prepare_calibration
    from quantmill.quantize.gptq.dequant import dequantized_tensors
    from quantmill.verify.backends.base import BackendOptions
    from quantmill.verify.evaluate import verify_artifacts

    # An adapter trained with PEFT on the plain llama whose weights the LCKV model shares (PEFT cannot load LCKV).
    plain = build_tiny_llama(tmp_path / "plain", smollm2_tokenizer_dir, 49152, num_hidden_layers=6, max_position_embeddings=256,
                             tie_word_embeddings=False)
    adapter = train_adapter(plain, tmp_path / "adapter", steps=2, r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "gate_proj"])
    base = build_tiny_lckv(tmp_path / "lckv", smollm2_tokenizer_dir, vocab_size=49152)
    original = lckv_fields(base)

    merged = tmp_path / "merged"
    assert main(["merge", str(base), "--adapter", str(adapter), "--out", str(merged)]) == 0
    assert (merged / "config.json").read_bytes() == (base / "config.json").read_bytes()
    ours, peft = load_file(str(merged / "model.safetensors")), peft_merge(plain, [(adapter, 1.0)]).state_dict()
    assert {k for k in peft if k not in ours} == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (1, 2, 3) for p in "kv"}
    assert max(float(np.abs(ours[k] - peft[k].numpy()).max()) for k in ours) <= 1e-6

    baked = tmp_path / "baked"
    assert main(["bake", str(merged), "--rope", "ntk-yarn", "--rope-factor", "2", "--out", str(baked)]) == 0
    assert lckv_fields(baked) == original
    assert json.loads((baked / "config.json").read_text())["rope_parameters"]["rope_type"] == "yarn"

    gptq = tmp_path / "gptq"
    assert main(["quantize", "gptq", str(baked), "--out", str(gptq), "--branch", "4bit-32g", "--calib", str(CORPUS),
                 "--calib-samples", "6", "--calib-seqlen", "48", "--no-progress"]) == 0
    [branch] = [p for p in gptq.iterdir() if p.is_dir()]
    assert lckv_fields(branch) == original
    assert json.loads((branch / "config.json").read_text())["quantization_config"]["bits"] == 4
    assert not any(".k_proj." in k and k.split(".")[2] in "123" for k in load_file(str(branch / "model.safetensors")))

    # On its calibration sequences, GPTQ (fed by the LCKV flow) beats round-to-nearest on the same grid.
    ids = torch.from_numpy(prepare_calibration(baked, str(CORPUS), 6, 48, 0, progress=False).token_ids.astype(np.int64))
    reference = LckvForCausalLM.from_checkpoint(baked)
    quantized = LckvForCausalLM.from_tensors(json.loads((branch / "config.json").read_text()), dequantized_tensors(branch), branch)
    rounded = LckvForCausalLM.from_checkpoint(baked)
    with torch.no_grad():
        for name, module in rounded.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                module.weight.copy_(_rtn(module.weight))
        want = reference(ids)
        gptq_err, rtn_err = float(((quantized(ids) - want) ** 2).mean()), float(((rounded(ids) - want) ** 2).mean())
    assert gptq_err < rtn_err, (gptq_err, rtn_err)

    [gguf_path] = convert_hf_to_gguf(baked, "f16", tmp_path / "baked.gguf", progress=False)
    assert gguf.GGUFReader(gguf_path).fields["lckv.layer_types"].contents() == W2_LAYER_TYPES

    text = tmp_path / "eval.txt"
    text.write_text(CORPUS.read_text(encoding="utf-8")[:5000], encoding="utf-8")
    result = verify_artifacts([branch], baked, text, 64, BackendOptions(threads=2), max_chunks=3, store=tmp_path / "ref.bin")
    ref, [quant] = result.reference, result.artifacts
    assert (ref.format, quant.format) == ("lckv", "lckv")
    assert np.isfinite(ref.metrics["ppl"]) and 0 < quant.metrics["kld_mean"] < 5 and quant.quant_type == "GPTQ-4bit"


@pytest.mark.slow
def test_gptq_branches_side_by_side_keep_their_own_kv(smollm2_tokenizer_dir: Path, tmp_path: Path) -> None:
    """Several branches in one pass each use the KV of their own quantized layers: a branch quantized alongside
    another is byte-identical to the same branch quantized alone; the non-true-sequential walk works too."""
    import dataclasses

    from quantmill.quantize.calibrate import prepare_calibration
    from quantmill.quantize.gptq.branches import parse_branch
    from quantmill.quantize.gptq.engine import EngineOptions, quantize_branches

    # layer 1 reads layer 0's KV (below: from the branch's own quantized layer 0), layers 2, 3 read layer 4's (above)
    model = build_tiny_lckv(tmp_path / "m", smollm2_tokenizer_dir, "0_0_4_4_4_5", vocab_size=49152)
    calib = prepare_calibration(model, str(CORPUS), 4, 32, 1, progress=False)
    four = parse_branch("4bit-32g")
    others = [four, dataclasses.replace(parse_branch("3bit-32g"), true_sequential=False, name_override="3bit-not-sequential")]
    together = quantize_branches(model, calib, others, tmp_path / "together", EngineOptions(progress=False))
    [alone] = quantize_branches(model, calib, [four], tmp_path / "alone", EngineOptions(progress=False))
    # the first branch is the one a shared KV store would corrupt (the second one writes last)
    assert (together[0].directory / "model.safetensors").read_bytes() == (alone.directory / "model.safetensors").read_bytes()
    assert lckv_fields(together[1].directory) == lckv_fields(model)
    assert json.loads((together[1].directory / "quantize_config.json").read_text())["true_sequential"] is False


# ---- bad layouts: one line, exit 2, nothing written


def _with_layer_types(model: Path, layer_types: str) -> Path:
    config = json.loads((model / "config.json").read_text())
    config["layer_types"] = layer_types
    (model / "config.json").write_text(json.dumps(config))
    return model


@pytest.fixture(scope="module")
def lckv_model(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    return build_tiny_lckv(tmp_path_factory.mktemp("lckv") / "m", smollm2_tokenizer_dir, vocab_size=49152)


@pytest.mark.parametrize(
    ("layer_types", "message"),
    [
        ("0_4_4_4_5", "has 5 entries but num_hidden_layers is 6"),
        ("0_4_4_4_4_5_5", "has 7 entries but num_hidden_layers is 6"),
        ("0_4_4_4_4_9", "entry 5 points to layer 9, outside the model's layers 0..5"),
        ("0_2_2_2_1_5", "layer 4 uses the KV of layer 1, but layer 1 uses layer 2's"),
        ("0_4_4_4x_4_5", "entry 3 is '4x'"),
    ],
)
@pytest.mark.parametrize("command", ["convert", "bake", "gptq"])
def test_bad_layer_types_exit_2_nothing_written(layer_types: str, message: str, command: str, lckv_model: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    model = _with_layer_types(shutil.copytree(lckv_model, tmp_path / "m"), layer_types)
    out = tmp_path / "out"
    argv = {
        "convert": ["convert", "hf-to-gguf", str(model), "--outfile", str(out), "--outtype", "f16"],
        "bake": ["bake", str(model), "--rope", "linear", "--rope-factor", "2", "--out", str(out)],
        "gptq": ["quantize", "gptq", str(model), "--out", str(out), "--branch", "4bit-32g", "--calib", str(CORPUS),
                 "--calib-samples", "2", "--calib-seqlen", "16", "--no-progress"],
    }[command]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err and "config.json" in err, err
    assert not out.exists() or not any(out.iterdir())
    assert not list(tmp_path.glob(".out.*"))


def test_layout_that_does_not_fit_the_tensors_exit_2(lckv_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _with_layer_types(shutil.copytree(lckv_model, tmp_path / "m"), "0_5_5_5_5_5")  # layer 4 has k_proj/v_proj
    out = tmp_path / "out.gguf"
    capsys.readouterr()
    assert main(["convert", "hf-to-gguf", str(model), "--outfile", str(out), "--outtype", "f16"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "layer 4 has k_proj but layer_types" in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.gguf.*"))
    with pytest.raises(InputFileError, match="layer 4 has k_proj"):
        LckvForCausalLM.from_checkpoint(model)


def test_imatrix_pass_refuses_lckv(lckv_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The layer-by-layer statistics pass runs layers one at a time, which LCKV layers cannot: a clear refusal."""
    out = tmp_path / "imatrix.gguf"
    capsys.readouterr()
    assert main(["calibrate", str(lckv_model), "--calib", str(CORPUS), "--calib-samples", "2", "--calib-seqlen", "16",
                 "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'lckv-llama' does not support the layer-by-layer statistics pass" in err, err
    assert not out.exists() and not list(tmp_path.glob(".imatrix*"))
