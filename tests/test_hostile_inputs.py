"""Hostile and faulty inputs (issue 12): every case is refused with exit code 2, one stderr line without a
traceback naming the field, tensor or path at fault, and no file outside quantmill's own temporaries created,
changed or removed (a snapshot of the workspace before and after).

The tables: config.json fields out of type or range (``convert hf-to-gguf``, ``quantize gptq``), tensors that
contradict config.json (missing, wrong shape, empty, too few layers, non-float), NaN/Inf in weights
(hf-to-gguf for every output type, GPTQ, ``quantize gguf``) and in an importance matrix, and the messages
of the remaining cases (a recipe ``rope.factor: .inf``, invalid config.json, a directory named
``model.safetensors``, an index that points outside the model directory, a pickle adapter inside ``run``,
an adapter whose ``target_modules`` the model does not have).
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from release_helpers import make_tiny_model  # noqa: E402
from test_output_safety import _write_adapter, assert_one_line, run_cli, snapshot  # noqa: E402
from tiny_gguf import bpe_vocab, write_tiny_gguf  # noqa: E402

NAN, INF = float("nan"), float("inf")
ST = "model/model.safetensors"


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def hostile_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from quantmill.cli import main

    root = tmp_path_factory.mktemp("hostile") / "ws"
    root.mkdir()
    make_tiny_model(root / "model")
    write_tiny_gguf(root / "m.gguf", bpe_vocab(), tied=False, seed=3)
    (root / "text.txt").write_text("The quick brown fox jumps over the lazy dog.\n" * 40, encoding="utf-8")
    code = main(["calibrate", str(root / "model"), "--calib-samples", "2", "--calib-seqlen", "16", "--no-progress",
                 "--out", str(root / "good.imatrix")])
    assert code == 0
    return root


@pytest.fixture
def ws(hostile_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "ws"
    shutil.copytree(hostile_template, root, symlinks=True)
    monkeypatch.setenv("QUANTMILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return root


# ----------------------------------------------------------------------------- mutations
def set_config(ws: Path, **changes: Any) -> None:
    path = ws / "model" / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is DELETE:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config), encoding="utf-8")  # NaN / Infinity as Python's json writes them


DELETE = object()


def edit_tensors(ws: Path, edit: Callable[[dict[str, np.ndarray]], None]) -> None:
    from safetensors.numpy import load_file, save_file

    path = ws / ST
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def drop(*names: str) -> Callable[[dict[str, np.ndarray]], None]:
    def edit(t: dict[str, np.ndarray]) -> None:
        for name in names:
            del t[name]
    return edit


def reshape(name: str, shape: tuple[int, ...]) -> Callable[[dict[str, np.ndarray]], None]:
    def edit(t: dict[str, np.ndarray]) -> None:
        t[name] = np.zeros(shape, dtype=np.float32) + 0.01
    return edit


def poison(name: str, value: float, where: tuple[int, ...] | None = None) -> Callable[[dict[str, np.ndarray]], None]:
    def edit(t: dict[str, np.ndarray]) -> None:
        array = t[name].copy()
        array.reshape(-1)[array.size // 2 if where is None else where[0]] = value
        t[name] = array
    return edit


def retype(name: str, dtype: Any) -> Callable[[dict[str, np.ndarray]], None]:
    def edit(t: dict[str, np.ndarray]) -> None:
        t[name] = t[name].astype(dtype)
    return edit


def hf_to_gguf(ws: Path, outtype: str = "f16") -> list[str]:
    return ["convert", "hf-to-gguf", str(ws / "model"), "--outtype", outtype, "--vocab-pre", "smollm", "--quiet",
            "--outfile", str(ws / "out.gguf")]


def gptq(ws: Path) -> list[str]:
    return ["quantize", "gptq", str(ws / "model"), "--branch", "4bit-32g", "--calib", str(ws / "text.txt"),
            "--calib-samples", "2", "--calib-seqlen", "16", "--no-progress", "--out", str(ws / "gptq")]


def check_refused(ws: Path, argv: list[str], named: str, capsys: pytest.CaptureFixture[str],
                  root: Path | None = None) -> str:
    root = root or ws
    before = snapshot(root)
    code, lines = run_cli(argv, capsys)
    assert_one_line(code, lines, named)
    assert snapshot(root) == before
    return lines[0]


# ----------------------------------------------------------------------------- config.json fields
L = "model.layers"
CONFIG_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "layers-1e12": ({"num_hidden_layers": 10**12}, "num_hidden_layers"),
    "layers-1025": ({"num_hidden_layers": 1025}, "num_hidden_layers"),
    "layers-zero": ({"num_hidden_layers": 0}, "num_hidden_layers"),
    "layers-negative": ({"num_hidden_layers": -2}, "num_hidden_layers"),
    "layers-string": ({"num_hidden_layers": "2"}, "num_hidden_layers"),
    "layers-float": ({"num_hidden_layers": 2.0}, "num_hidden_layers"),
    "layers-bool": ({"num_hidden_layers": True}, "num_hidden_layers"),
    "layers-list": ({"num_hidden_layers": [2]}, "num_hidden_layers"),
    "hidden-huge": ({"hidden_size": 10**9}, "hidden_size"),
    "hidden-string": ({"hidden_size": "64"}, "hidden_size"),
    "hidden-zero": ({"hidden_size": 0}, "hidden_size"),
    "heads-zero": ({"num_attention_heads": 0}, "num_attention_heads"),
    "heads-huge": ({"num_attention_heads": 4096}, "num_attention_heads"),
    "heads-float": ({"num_attention_heads": 4.5}, "num_attention_heads"),
    "kv-heads-zero": ({"num_key_value_heads": 0}, "num_key_value_heads"),
    "kv-heads-huge": ({"num_key_value_heads": 5000}, "num_key_value_heads"),
    "kv-heads-string": ({"num_key_value_heads": "two"}, "num_key_value_heads"),
    "vocab-huge": ({"vocab_size": 2**23}, "vocab_size"),
    "vocab-negative": ({"vocab_size": -5}, "vocab_size"),
    "ffn-huge": ({"intermediate_size": 2**30}, "intermediate_size"),
    "ffn-zero": ({"intermediate_size": 0}, "intermediate_size"),
    "head-dim-zero": ({"head_dim": 0}, "head_dim"),
    "head-dim-negative": ({"head_dim": -16}, "head_dim"),
    "context-negative": ({"max_position_embeddings": -1}, "max_position_embeddings"),
    "context-zero": ({"max_position_embeddings": 0}, "max_position_embeddings"),
    "context-huge": ({"max_position_embeddings": 2**25}, "max_position_embeddings"),
    "context-string": ({"max_position_embeddings": "abc"}, "max_position_embeddings"),
    "eps-string": ({"rms_norm_eps": "abc"}, "rms_norm_eps"),
    "eps-nan": ({"rms_norm_eps": NAN}, "rms_norm_eps"),
    "eps-inf": ({"rms_norm_eps": INF}, "rms_norm_eps"),
    "eps-zero": ({"rms_norm_eps": 0}, "rms_norm_eps"),
    "eps-negative": ({"rms_norm_eps": -1e-5}, "rms_norm_eps"),
    "eps-one": ({"rms_norm_eps": 1.0}, "rms_norm_eps"),
    "layer-norm-eps-nan": ({"layer_norm_eps": NAN}, "layer_norm_eps"),
    "rope-theta-top-nan": ({"rope_theta": NAN}, "rope_theta"),
    "rope-theta-nan": ({"rope_parameters": {"rope_type": "default", "rope_theta": NAN}}, "rope_theta"),
    "rope-theta-inf": ({"rope_parameters": {"rope_type": "default", "rope_theta": INF}}, "rope_theta"),
    "rope-theta-negative": ({"rope_parameters": {"rope_type": "default", "rope_theta": -10000.0}}, "rope_theta"),
    "rope-theta-zero": ({"rope_parameters": {"rope_type": "default", "rope_theta": 0}}, "rope_theta"),
    "rope-theta-string": ({"rope_parameters": {"rope_type": "default", "rope_theta": "big"}}, "rope_theta"),
    "rope-factor-nan": ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": NAN}}, "factor"),
    "rope-factor-inf": ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": INF}}, "factor"),
    "rope-factor-negative": ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": -4.0,
                                                  "original_max_position_embeddings": 128}}, "factor"),
    "rope-yarn-beta-nan": ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "beta_fast": NAN,
                                                "original_max_position_embeddings": 128}}, "beta_fast"),
    "rope-llama3-low-nan": ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0,
                                                 "low_freq_factor": NAN, "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 128}}, "low_freq_factor"),
    "rope-orig-ctx-negative": ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                                    "original_max_position_embeddings": -128}},
                               "original_max_position_embeddings"),
    "rope-long-factor-inf": ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4,
                                                  "long_factor": [1.0, INF], "short_factor": [1.0, 1.0]}}, "long_factor"),
    "rope-params-not-object": ({"rope_parameters": "linear"}, "rope_parameters"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_field_refused_by_hf_to_gguf(case: str, ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    changes, named = CONFIG_CASES[case]
    set_config(ws, **changes)
    check_refused(ws, hf_to_gguf(ws), named, capsys)


GPTQ_CONFIG_CASES = ("layers-1e12", "eps-string", "context-negative", "rope-theta-nan", "hidden-huge", "heads-zero")


@pytest.mark.parametrize("case", GPTQ_CONFIG_CASES)
def test_config_field_refused_by_gptq(case: str, ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    changes, named = CONFIG_CASES[case]
    set_config(ws, **changes)
    check_refused(ws, gptq(ws), named, capsys)


# ----------------------------------------------------------------------------- tensors against config.json
TENSOR_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing-q-layer1": (lambda ws: edit_tensors(ws, drop(f"{L}.1.self_attn.q_proj.weight")), f"{L}.1.self_attn.q_proj.weight"),
    "missing-q-every-layer": (lambda ws: edit_tensors(ws, drop(f"{L}.0.self_attn.q_proj.weight", f"{L}.1.self_attn.q_proj.weight")),
                              f"{L}.0.self_attn.q_proj.weight"),
    "missing-down": (lambda ws: edit_tensors(ws, drop(f"{L}.1.mlp.down_proj.weight")), f"{L}.1.mlp.down_proj.weight"),
    "missing-norm": (lambda ws: edit_tensors(ws, drop(f"{L}.0.input_layernorm.weight")), f"{L}.0.input_layernorm.weight"),
    "missing-final-norm": (lambda ws: edit_tensors(ws, drop("model.norm.weight")), "output_norm.weight"),
    "missing-embedding": (lambda ws: edit_tensors(ws, drop("model.embed_tokens.weight")), "token_embd.weight"),
    "fewer-layers": (lambda ws: set_config(ws, num_hidden_layers=3), f"{L}.2."),
    "q-wrong-rows": (lambda ws: edit_tensors(ws, reshape(f"{L}.0.self_attn.q_proj.weight", (48, 64))), f"{L}.0.self_attn.q_proj.weight"),
    "k-wrong-rows": (lambda ws: edit_tensors(ws, reshape(f"{L}.1.self_attn.k_proj.weight", (64, 64))), f"{L}.1.self_attn.k_proj.weight"),
    "v-wrong-cols": (lambda ws: edit_tensors(ws, reshape(f"{L}.0.self_attn.v_proj.weight", (32, 32))), f"{L}.0.self_attn.v_proj.weight"),
    "o-transposed-ffn": (lambda ws: edit_tensors(ws, reshape(f"{L}.0.mlp.down_proj.weight", (128, 64))), f"{L}.0.mlp.down_proj.weight"),
    "gate-wrong": (lambda ws: edit_tensors(ws, reshape(f"{L}.1.mlp.gate_proj.weight", (96, 64))), f"{L}.1.mlp.gate_proj.weight"),
    "q-3d": (lambda ws: edit_tensors(ws, reshape(f"{L}.0.self_attn.q_proj.weight", (4, 16, 64))), f"{L}.0.self_attn.q_proj.weight"),
    "norm-wrong-size": (lambda ws: edit_tensors(ws, reshape(f"{L}.0.post_attention_layernorm.weight", (65,))),
                        f"{L}.0.post_attention_layernorm.weight"),
    "norm-zero-size": (lambda ws: edit_tensors(ws, reshape(f"{L}.1.input_layernorm.weight", (0,))), f"{L}.1.input_layernorm.weight"),
    "final-norm-zero-size": (lambda ws: edit_tensors(ws, reshape("model.norm.weight", (0,))), "model.norm.weight"),
    "matrix-zero-size": (lambda ws: edit_tensors(ws, reshape(f"{L}.0.mlp.up_proj.weight", (0, 64))), f"{L}.0.mlp.up_proj.weight"),
    "hidden-disagrees": (lambda ws: set_config(ws, hidden_size=128, head_dim=32), "shape"),
    "heads-disagree": (lambda ws: set_config(ws, num_key_value_heads=4), f"{L}.0.self_attn.k_proj.weight"),
    "int-weights": (lambda ws: edit_tensors(ws, retype(f"{L}.0.mlp.up_proj.weight", np.int32)), f"{L}.0.mlp.up_proj.weight"),
}


@pytest.mark.parametrize("case", sorted(TENSOR_CASES))
def test_tensor_contradicting_config_refused_by_hf_to_gguf(case: str, ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    setup, named = TENSOR_CASES[case]
    setup(ws)
    check_refused(ws, hf_to_gguf(ws), named, capsys)


GPTQ_TENSOR_CASES = ("missing-q-layer1", "fewer-layers", "q-wrong-rows", "norm-zero-size", "heads-disagree")


@pytest.mark.parametrize("case", GPTQ_TENSOR_CASES)
def test_tensor_contradicting_config_refused_by_gptq(case: str, ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    setup, named = TENSOR_CASES[case]
    setup(ws)
    check_refused(ws, gptq(ws), named, capsys)  # no empty --out directory left either


# ----------------------------------------------------------------------------- NaN / Inf weights
NAN_TENSORS = {
    "q-nan": (f"{L}.0.self_attn.q_proj.weight", NAN),  # row-permuted: encoded in chunks
    "embed-inf": ("model.embed_tokens.weight", INF),
    "norm-nan": (f"{L}.1.input_layernorm.weight", NAN),  # F32 norm: copied as stored
    "down-neg-inf": (f"{L}.1.mlp.down_proj.weight", -INF),
    "lm-head-nan": ("lm_head.weight", NAN),
}


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("case", sorted(NAN_TENSORS))
def test_non_finite_weights_refused_by_hf_to_gguf(case: str, outtype: str, ws: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    name, value = NAN_TENSORS[case]
    edit_tensors(ws, poison(name, value))
    line = check_refused(ws, hf_to_gguf(ws, outtype), name, capsys)
    assert "NaN" in line


def test_non_finite_f16_weights_refused(ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def edit(t: dict[str, np.ndarray]) -> None:
        for key in list(t):
            t[key] = t[key].astype(np.float16)
        t[f"{L}.0.mlp.up_proj.weight"].reshape(-1)[5] = np.float16(np.inf)
    edit_tensors(ws, edit)
    check_refused(ws, hf_to_gguf(ws, "f16"), f"{L}.0.mlp.up_proj.weight", capsys)  # F16 -> F16 is copied as stored


@pytest.mark.parametrize("case", ["q-nan", "norm-nan", "embed-inf"])
def test_non_finite_weights_refused_by_gptq(case: str, ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name, value = NAN_TENSORS[case]
    if case == "embed-inf":
        edit_tensors(ws, lambda t: t["model.embed_tokens.weight"].__setitem__(slice(None), INF))
    else:
        edit_tensors(ws, poison(name, value))
    check_refused(ws, gptq(ws), name, capsys)  # no branch with NaN scales, no empty --out directory


def _poison_gguf(path: Path, tensor: str, value: float) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(path, "r+")
    found = next(t for t in reader.tensors if t.name == tensor)
    found.data.reshape(-1)[1] = value
    reader.data.flush()


@pytest.mark.parametrize("tensor,value", [("token_embd.weight", NAN), ("blk.0.attn_q.weight", INF),
                                          ("output_norm.weight", NAN), ("blk.1.ffn_down.weight", -INF)])
def test_non_finite_weights_refused_by_quantize_gguf(tensor: str, value: float, ws: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    _poison_gguf(ws / "m.gguf", tensor, value)
    line = check_refused(ws, ["quantize", "gguf", str(ws / "m.gguf"), "--type", "Q8_0", "--out", str(ws / "q.gguf")],
                         tensor, capsys)
    assert "m.gguf" in line


@pytest.mark.parametrize("value", [NAN, INF])
def test_non_finite_imatrix_is_blamed_on_the_imatrix(value: float, ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(ws / "good.imatrix", "r+")
    first = next(t for t in reader.tensors if t.name.endswith(".in_sum2"))
    first.data.reshape(-1)[0] = value
    reader.data.flush()
    line = check_refused(ws, ["quantize", "gguf", str(ws / "m.gguf"), "--type", "Q4_K_M", "--imatrix",
                              str(ws / "good.imatrix"), "--out", str(ws / "q.gguf")], "good.imatrix", capsys)
    assert first.name in line and line.split(":")[2].strip().endswith("good.imatrix"), line


# ----------------------------------------------------------------------------- messages
def _recipe(ws: Path, **changes: Any) -> Path:
    data: dict[str, Any] = {"name": "tiny", "source": {"kind": "local", "path": "model"},
                            "gguf": {"base": "f16", "types": []}, "verify": None, "work_dir": "work", "threads": 1}
    data.update(changes)
    path = ws / "release.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("rope,named", [
    ({"method": "linear", "factor": INF}, "rope.factor"),
    ({"method": "linear", "factor": NAN}, "rope.factor"),
    ({"method": "yarn", "factor": 4.0, "params": {"beta_fast": INF}}, "rope.params"),
])
def test_recipe_rope_not_finite_refused_at_dry_run(rope: dict[str, Any], named: str, ws: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _recipe(ws, rope=rope)
    line = check_refused(ws, ["run", str(recipe), "--dry-run"], named, capsys)
    assert "--rope-factor" not in line


@pytest.mark.parametrize("text", ['{"model_type": "llama",', "not json at all", "[1, 2]", ""])
def test_invalid_config_json_message(text: str, ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (ws / "model" / "config.json").write_text(text, encoding="utf-8")
    line = check_refused(ws, hf_to_gguf(ws), "config.json", capsys)
    assert "tokenizer" not in line, line


def test_safetensors_that_is_a_directory(ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (ws / ST).unlink()
    (ws / ST).mkdir()
    line = check_refused(ws, hf_to_gguf(ws), "model.safetensors", capsys)
    assert "directory" in line and "index" not in line, line


def _write_index(ws: Path, target: str) -> None:
    from safetensors import safe_open

    with safe_open(str(ws / ST), "np") as f:
        names = list(f.keys())
    weight_map = {name: "model.safetensors" for name in names}
    weight_map[names[0]] = target
    (ws / "model" / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}),
                                                              encoding="utf-8")


@pytest.mark.parametrize("target", ["../../outside.safetensors", "../model/model.safetensors", "/etc/passwd",
                                    "sub/model.safetensors", ".."])
@pytest.mark.parametrize("command", ["hf-to-gguf", "gptq"])
def test_index_never_reads_outside_the_model_dir(target: str, command: str, ws: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    _write_index(ws, target.replace("/etc/passwd", str(ws / "m.gguf")))
    argv = hf_to_gguf(ws) if command == "hf-to-gguf" else gptq(ws)
    check_refused(ws, argv, "weight_map", capsys)


def test_pickle_adapter_inside_run_says_what_to_do(ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    adapter = ws / "adapter"
    _write_adapter(adapter)
    from safetensors.numpy import load_file

    torch.save({k: torch.from_numpy(v) for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()},
               adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    recipe = _recipe(ws, adapters=[{"path": "adapter"}])
    outside = {k: v for k, v in snapshot(ws).items() if not k.startswith("work")}
    code, lines = run_cli(["run", str(recipe), "--no-publish"], capsys)
    assert_one_line(code, lines, "adapter_model.bin")
    assert "--allow-pickle" not in lines[0].replace("quantmill merge --allow-pickle", ""), lines
    assert "safe_serialization" in lines[0]
    assert {k: v for k, v in snapshot(ws).items() if not k.startswith("work")} == outside


@pytest.mark.parametrize("targets", [["not_a_module"], ["q_proj_typo", "w_nothing"], ".*\\.nowhere"])
def test_merge_refuses_target_modules_the_model_lacks(targets: Any, ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = ws / "adapter"
    _write_adapter(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    config["target_modules"] = targets
    (adapter / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    check_refused(ws, ["merge", str(ws / "model"), "--adapter", str(adapter), "--out", str(ws / "merged")],
                  "target_modules", capsys)



@pytest.mark.parametrize("model", [5, "bpe", None, [1]])
def test_tokenizer_json_with_a_broken_model_field(model: Any, ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = ws / "model" / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["model"] = model
    path.write_text(json.dumps(data), encoding="utf-8")
    check_refused(ws, hf_to_gguf(ws), "tokenizer.json", capsys)


@pytest.mark.parametrize("factor", ["1e308", "1e30", "100000000"])
def test_bake_refuses_a_factor_beyond_any_context(factor: str, ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    check_refused(ws, ["bake", str(ws / "model"), "--rope", "linear", "--rope-factor", factor, "--out", str(ws / "baked")],
                  "--rope-factor", capsys)
