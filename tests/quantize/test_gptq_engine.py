"""The streaming GPTQ engine on tiny random llamas: branch directories, configs, determinism, errors."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from quantmill.calib_data.loaders import CalibrationText
from quantmill.calib_data.sampling import CalibrationSet, load_tokenize, sample_sequences
from quantmill.cli import main
from quantmill.convert.arch.llama import LlamaArchitecture
from quantmill.errors import UnsupportedError, UserInputError
from quantmill.quantize.gptq.algorithm import gptq_quantize
from quantmill.quantize.gptq.branches import parse_branch, parse_branches
from quantmill.quantize.gptq.dequant import dequantized_tensors, gptq_size_figures, load_dequantized_model, read_gptq_config
from quantmill.quantize.gptq.engine import EngineOptions, quantize_branches

TEXT = (Path(__file__).resolve().parents[2] / "calib_data" / "corpora" / "calib_as_you_like_it.txt").read_text(encoding="utf-8")
GROUPS = LlamaArchitecture.decoder.linear_groups
QUIET = EngineOptions(device="cpu", progress=False)  # explicitly: the CPU path of the device plumbing


@pytest.fixture
def tiny(make_tiny_llama) -> Path:
    return make_tiny_llama("bpe", name="tiny16", dtype="float16", num_hidden_layers=3, tie_word_embeddings=True)


@pytest.fixture
def calib(tiny: Path) -> CalibrationSet:
    return sample_sequences(CalibrationText("ayli", (TEXT,)), load_tokenize(tiny), samples=6, seqlen=48, seed=3)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reference_gptq(model_dir: Path, ids: np.ndarray, spec_text: str) -> dict[str, torch.Tensor]:
    """Naive GPTQ over the whole transformers model: each linear quantized alone, full forwards everywhere."""
    from transformers import AutoModelForCausalLM

    spec = parse_branch(spec_text)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hidden = model.model.embed_tokens(torch.from_numpy(ids.astype(np.int64)))
    positions = torch.arange(ids.shape[1])[None]
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        pos = model.model.rotary_emb(hidden, positions)
        for index, layer in enumerate(model.model.layers):
            for group in GROUPS:
                xtx: dict[str, torch.Tensor] = {}
                hooks = []
                for name in group:
                    def hook(_m, args, _n=name, xtx=xtx):
                        x = args[0].reshape(-1, args[0].shape[-1])
                        xtx[_n] = x.T @ x
                    hooks.append(layer.get_submodule(name).register_forward_pre_hook(hook))
                layer(hidden, position_embeddings=pos)
                for h in hooks:
                    h.remove()
                for name in group:
                    linear = layer.get_submodule(name)
                    result = gptq_quantize(linear.weight, xtx[name], spec)
                    linear.weight.copy_(result.dequantized)
                    out[f"model.layers.{index}.{name}.weight"] = result.dequantized
            hidden = layer(hidden, position_embeddings=pos)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return out


def test_engine_matches_a_naive_whole_model_gptq(tiny: Path, calib: CalibrationSet, tmp_path: Path) -> None:
    """Streaming, stacking, the pre-norm flow and the generic flow against a naive whole-model GPTQ.

    Layer 0 sees identical inputs, so its weights must agree code for code (stacking q/k/v may move a
    rare code by float rounding order). Deeper layers see inputs that already differ by such rare
    codes, which can reorder act-order columns, so there the quantized models are compared by output.
    """
    from transformers import AutoModelForCausalLM

    spec = "4bit-32g-actorder"
    expected = reference_gptq(tiny, calib.token_ids, spec)
    assert len(expected) == 3 * 7
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    ids = torch.from_numpy(calib.token_ids.astype(np.int64))
    with torch.no_grad():
        float_logits = model(ids).logits
        model.load_state_dict(expected, strict=False)
        naive_logits = model(ids).logits
    naive_error = float((naive_logits - float_logits).norm() / float_logits.norm())
    for fast in (True, False):
        out = tmp_path / ("fast" if fast else "generic")
        quantize_branches(tiny, calib, parse_branches([spec]), out, EngineOptions(progress=False, fast_flow=fast))
        branch = out / "gptq-4bit-32g-actorder_True"
        got = dict(dequantized_tensors(branch))
        for name, weight in expected.items():
            if name.startswith("model.layers.0."):
                assert (np.abs(got[name] - weight.numpy()) > 1e-6).mean() < 0.01, name
        with torch.no_grad():
            ours = load_dequantized_model(branch)(ids).logits
        assert float((ours - naive_logits).norm() / naive_logits.norm()) < 0.1 * naive_error
        assert float((ours - float_logits).norm() / float_logits.norm()) < 1.2 * naive_error


def test_branches_configs_and_files(tiny: Path, calib: CalibrationSet, tmp_path: Path) -> None:
    specs = parse_branches(["4bit-32g-actorder", "3bit-none", "main=8bit-64g-asym", "2bit-32g-static"])
    out = tmp_path / "out"
    results = quantize_branches(tiny, calib, specs, out, QUIET)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["gptq-4bit-32g-actorder_True", "gptq-3bit--1g-actorder_False", "main", "gptq-2bit-32g-actorder_False-static"])
    source_config = json.loads((tiny / "config.json").read_text())
    for spec, result in zip(specs, results, strict=True):
        branch = out / spec.name
        assert result.directory == branch and result.files == ["model.safetensors"]
        assert not list(branch.glob(".*")), "no spool or temporary file left"
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            assert (branch / name).read_bytes() == (tiny / name).read_bytes()
        config = json.loads((branch / "config.json").read_text())
        qconfig = json.loads((branch / "quantize_config.json").read_text())
        assert config["quantization_config"] == qconfig == read_gptq_config(branch)
        assert {k: v for k, v in config.items() if k not in ("quantization_config", "dtype", "torch_dtype")} == {
            k: v for k, v in source_config.items() if k not in ("dtype", "torch_dtype")}
        assert config["dtype"] == "float16"
        assert qconfig["bits"] == spec.bits and qconfig["group_size"] == spec.group_size
        assert qconfig["desc_act"] == spec.desc_act and qconfig["sym"] == spec.sym
        assert qconfig["static_groups"] == spec.static_groups and qconfig["true_sequential"] is True
        assert qconfig["quant_method"] == "gptq" and qconfig["checkpoint_format"] == "gptq" and qconfig["damp_percent"] == 0.01
        assert qconfig["meta"]["calibration"]["token_sha256"] == calib.sha256
        assert qconfig["meta"]["fallback"] == {}
        log = json.loads((branch / "quantization_log.json").read_text())
        assert len(log) == 21 and all(r["tokens"] == calib.samples * calib.seqlen for r in log.values())
        from safetensors import safe_open

        with safe_open(branch / "model.safetensors", "np") as f:
            keys = set(f.keys())
            q = f.get_tensor("model.layers.1.mlp.down_proj.qweight")
            assert q.dtype == np.int32 and q.shape == (128 * spec.bits // 32, 64)
            assert f.get_tensor("model.layers.1.mlp.down_proj.scales").dtype == np.float16
            assert f.get_tensor("model.embed_tokens.weight").dtype == np.float16
            assert f.get_tensor("model.norm.weight").dtype == np.float16
        assert "model.layers.0.self_attn.q_proj.weight" not in keys and "lm_head.weight" not in keys
        assert {k.rsplit(".", 1)[1] for k in keys if ".self_attn.q_proj." in k} == {"qweight", "qzeros", "scales", "g_idx"}
        size, bpw, _ = gptq_size_figures(branch)
        assert size == (branch / "model.safetensors").stat().st_size and 0 < bpw < 16


def test_dequantized_model_is_close_to_the_float_model(tiny: Path, calib: CalibrationSet, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    quantize_branches(tiny, calib, parse_branches(["8bit-32g-actorder", "4bit-32g-actorder"]), out, QUIET)
    reference = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    ids = torch.from_numpy(calib.token_ids[:2].astype(np.int64))
    with torch.no_grad():
        ref = reference(ids).logits
        errors = {}
        for name in ("gptq-8bit-32g-actorder_True", "gptq-4bit-32g-actorder_True"):
            got = load_dequantized_model(out / name)(ids).logits
            errors[name] = float((got - ref).norm() / ref.norm())
    assert errors["gptq-8bit-32g-actorder_True"] < 0.03
    assert errors["gptq-8bit-32g-actorder_True"] < errors["gptq-4bit-32g-actorder_True"] < 0.5


def test_same_inputs_give_byte_identical_files(tiny: Path, calib: CalibrationSet, tmp_path: Path) -> None:
    specs = parse_branches(["4bit-32g-actorder", "3bit-64g-asym", "4bit-32g-actorder-mse"])
    quantize_branches(tiny, calib, specs, tmp_path / "a", QUIET)
    quantize_branches(tiny, calib, specs, tmp_path / "b", QUIET)
    for spec in specs:
        for path in sorted((tmp_path / "a" / spec.name).iterdir()):
            assert sha256(path) == sha256(tmp_path / "b" / spec.name / path.name), path.name


def test_sharded_output_loads(tiny: Path, calib: CalibrationSet, tmp_path: Path) -> None:
    opts = EngineOptions(progress=False, max_shard_bytes=2_000_000)
    [result] = quantize_branches(tiny, calib, parse_branches(["4bit-64g"]), tmp_path / "out", opts)
    assert len(result.files) > 1 and (result.directory / "model.safetensors.index.json").is_file()
    single = tmp_path / "single"
    quantize_branches(tiny, calib, parse_branches(["4bit-64g"]), single, QUIET)
    a = dict(dequantized_tensors(result.directory))
    b = dict(dequantized_tensors(single / "gptq-4bit-64g-actorder_False"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_singular_hessian_falls_back_and_is_recorded(make_tiny_llama, tmp_path: Path) -> None:
    """A norm weight of 1e30 overflows the layer-1 inputs to inf: no damping can save that Hessian."""
    from safetensors.numpy import load_file, save_file

    model = make_tiny_llama("bpe", name="tiny_inf", dtype="float32", num_hidden_layers=2)
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.1.input_layernorm.weight"][:] = 1e30
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    calib = sample_sequences(CalibrationText("ayli", (TEXT,)), load_tokenize(model), samples=2, seqlen=32, seed=0)
    [result] = quantize_branches(model, calib, parse_branches(["4bit-32g"]), tmp_path / "out", QUIET)
    meta = json.loads((result.directory / "quantize_config.json").read_text())["meta"]
    assert meta["fallback"]["model.layers.1.self_attn.q_proj"] == "rtn"
    assert json.loads((result.directory / "config.json").read_text())["quantization_config"]["meta"] == meta
    assert "model.layers.0.self_attn.q_proj" not in meta["fallback"]
    assert np.isfinite(dict(dequantized_tensors(result.directory))["model.layers.1.self_attn.q_proj.weight"]).all()


def test_unsupported_architecture_leaves_nothing(tiny: Path, calib: CalibrationSet, tmp_path: Path) -> None:
    config = json.loads((tiny / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (tiny / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedError, match="GPT2LMHeadModel is not supported"):
        quantize_branches(tiny, calib, parse_branches(["4bit-32g"]), tmp_path / "out", QUIET)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_unpackable_width_is_refused_before_any_output(make_tiny_llama, tmp_path: Path) -> None:
    model = make_tiny_llama("bpe", name="odd", dtype="float16", num_hidden_layers=1, intermediate_size=72)
    calib = sample_sequences(CalibrationText("ayli", (TEXT,)), load_tokenize(model), samples=2, seqlen=32, seed=0)
    with pytest.raises(UnsupportedError, match="not a multiple of 32"):
        quantize_branches(model, calib, parse_branches(["4bit-32g"]), tmp_path / "out", QUIET)
    assert not (tmp_path / "out").exists()


def test_failure_midway_leaves_no_branch_directory(tiny: Path, calib: CalibrationSet, tmp_path: Path, monkeypatch) -> None:
    import quantmill.quantize.gptq.engine as engine

    calls = {"n": 0}
    real = engine.gptq_quantize

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "gptq_quantize", failing)
    (tmp_path / "out" / "main").mkdir(parents=True)
    (tmp_path / "out" / "main" / "old.txt").write_text("previous release")
    with pytest.raises(RuntimeError, match="disk on fire"):
        quantize_branches(tiny, calib, parse_branches(["main=4bit-32g", "8bit-none"]), tmp_path / "out", QUIET)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["main"]
    assert [p.name for p in (tmp_path / "out" / "main").iterdir()] == ["old.txt"]


def run_cli(*args: str) -> int:
    return main(list(args))


def test_cli_writes_branches_and_reports_bad_input(tiny: Path, tmp_path: Path, capsys) -> None:
    text = tmp_path / "calib.txt"
    text.write_text(TEXT[:20000], encoding="utf-8")
    out = tmp_path / "out"
    base = ["quantize", "gptq", str(tiny), "--out", str(out), "--calib", str(text), "--calib-samples", "4",
            "--calib-seqlen", "32", "--no-progress"]
    assert run_cli(*base, "--branch", "4bit-32g-actorder", "--branch", "main=8bit-none") == 0
    printed = capsys.readouterr().out
    assert "gptq-4bit-32g-actorder_True" in printed and "sha256" in printed
    assert (out / "main" / "model.safetensors").is_file()
    bad = {
        "5bit-32g": "5-bit GPTQ is not supported",
        "4bit-48g": "group size 48 is not supported",
    }
    for spec, message in bad.items():
        assert run_cli(*base, "--branch", spec) == 2
        assert message in capsys.readouterr().err
    too_many = ["quantize", "gptq", str(tiny), "--out", str(tmp_path / "none"), "--calib", str(text),
                "--calib-samples", "400", "--calib-seqlen", "512", "--branch", "4bit-32g", "--no-progress"]
    assert run_cli(*too_many) == 2
    err = capsys.readouterr().err
    assert "requested" in err and str(text) in err
    assert not (tmp_path / "none").exists()
    with pytest.raises(UserInputError):
        parse_branches([])


def test_verify_evaluates_gptq_branches(tiny: Path, calib: CalibrationSet, tmp_path: Path, capsys) -> None:
    from quantmill.verify.backends import detect_format

    out = tmp_path / "out"
    quantize_branches(tiny, calib, parse_branches(["8bit-32g-actorder", "2bit-32g"]), out, QUIET)
    eight, two = out / "gptq-8bit-32g-actorder_True", out / "gptq-2bit-32g-actorder_False"
    assert detect_format(eight) == "gptq" and detect_format(tiny) == "hf"
    text = tmp_path / "eval.txt"
    text.write_text(TEXT[20000:32000], encoding="utf-8")
    report = tmp_path / "report.json"
    # exit code 1: verify's quality thresholds (set for SmolLM2-sized models) fail a random model's 2-bit branch
    assert main(["verify", str(eight), str(two), "--reference", str(tiny), "--text", str(text), "--n-ctx", "64",
                 "--max-chunks", "6", "--json", str(report)]) in (0, 1)
    records = {Path(r["path"]).name: r for r in json.loads(report.read_text())["artifacts"]}
    ref, r8, r2 = records[tiny.name], records[eight.name], records[two.name]
    assert r8["format"] == r2["format"] == "gptq"
    assert abs(r8["delta_ppl_pct"]) < 0.5 < abs(r2["delta_ppl_pct"])  # a random model: 2-bit moves it, 8-bit hardly
    assert r2["bpw"] < r8["bpw"] < ref["bpw"] == 16
    assert "gptq" in capsys.readouterr().out
