"""Falcon → GGUF: tiny random 7B-style, 40B-style and RefinedWeb-config models run in llama.cpp as in transformers;
NTK-YaRN baked into a tiny Falcon-40B-style model gives the formula's attention logits in both runtimes."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from conftest import transformers_logits
from test_rope_bake import assert_close, llama_cpp_logits, max_rel_err, plain_inv_freq, rotate

from quantmill.cli import main as cli_main
from quantmill.convert.arch.falcon import qkv_row_order
from quantmill.convert.bake import BAKE_RECORD
from quantmill.convert.hf_to_gguf import convert_hf_to_gguf

TOKENS = [(37 * i + 11) % 1000 for i in range(160)]
# llama.cpp's GELU is the tanh approximation, transformers' Falcon the exact erf one: measured 5e-4.
FALCON_REL = 3e-3
STYLES: dict[str, dict[str, Any]] = {
    "7b": {"multi_query": True},  # one KV head, one layer norm
    "40b": {"new_decoder_architecture": True, "num_kv_heads": 2},  # GQA, ln_attn + ln_mlp
    "mha": {"multi_query": False},  # per-head q/k/v interleaving
}


def build_tiny_falcon(out: Path, tokenizer_dir: Path, **overrides: Any) -> Path:
    import torch
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    settings = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "initializer_range": 0.1,
                "bos_token_id": 1, "eos_token_id": 2, "max_position_embeddings": 4096, **overrides}
    FalconForCausalLM(FalconConfig(vocab_size=49152, **settings)).eval().save_pretrained(out)
    for path in sorted(tokenizer_dir.iterdir()):
        shutil.copy(path, out / path.name)
    return out


def gguf_fields(path: Path) -> dict[str, Any]:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("tokenizer.")}


def as_refinedweb(model_dir: Path, out: Path, model_type: str, **extra: Any) -> Path:
    """The same checkpoint with an old RefinedWeb config.json (custom-code names, an auto_map that must never run)."""
    shutil.copytree(model_dir, out)
    config = json.loads((model_dir / "config.json").read_text())
    renames = {"num_attention_heads": "n_head", "num_kv_heads": "n_head_kv", "num_hidden_layers": "n_layer"}
    rw = {renames.get(k, k): v for k, v in config.items()
          if k not in ("model_type", "architectures", "new_decoder_architecture", "max_position_embeddings", "rope_parameters")}
    if model_type == "RefinedWebModel":
        rw.pop("n_head_kv")
    rw.update(model_type=model_type, architectures=["RWForCausalLM"], auto_map={"AutoModelForCausalLM": "modelling_RW.RWForCausalLM"}, **extra)
    (out / "config.json").write_text(json.dumps(rw, indent=2))
    (out / "modelling_RW.py").write_text("raise SystemExit('remote code was executed')\n")
    return out


@pytest.mark.parametrize("style", sorted(STYLES))
def test_falcon_gguf_matches_transformers(style: str, smollm2_tokenizer_dir: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    model = build_tiny_falcon(tmp_path / style, smollm2_tokenizer_dir, **STYLES[style])
    [out] = convert_hf_to_gguf(model, "f32", tmp_path / "m.gguf", progress=False)
    fields = gguf_fields(out)
    n_kv = {"7b": 1, "40b": 2, "mha": 4}[style]
    assert fields["general.architecture"] == "falcon"
    assert fields["falcon.context_length"] == 4096  # the config's, not llama.cpp's hard-coded 2048
    assert (fields["falcon.attention.head_count"], fields["falcon.attention.head_count_kv"]) == (4, n_kv)
    assert fields["falcon.rope.freq_base"] == 10000.0 and fields["falcon.rope.dimension_count"] == 16
    assert fields["falcon.tensor_data_layout"] == "jploski" and fields["falcon.feed_forward_length"] == 256

    # Tensors round-trip: the GGUF holds the checkpoint's values, QKV rows regrouped, nothing else changed.
    weights = load_file(str(model / "model.safetensors"))
    tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(out).tensors}
    order = qkv_row_order(4, n_kv, 16)
    assert np.array_equal(order, np.arange(order.size)) == (n_kv == 1)  # multi-query is already q…q k v
    for i in range(2):
        qkv = weights[f"transformer.h.{i}.self_attention.query_key_value.weight"]
        assert np.array_equal(tensors[f"blk.{i}.attn_qkv.weight"], qkv[order])
        norm = "ln_mlp" if style == "40b" else "input_layernorm"
        assert np.array_equal(tensors[f"blk.{i}.attn_norm.weight"], weights[f"transformer.h.{i}.{norm}.weight"])
        assert (f"blk.{i}.attn_norm_2.weight" in tensors) == (style == "40b")
    assert np.array_equal(tensors["token_embd.weight"], weights["transformer.word_embeddings.weight"])

    hf = transformers_logits(model, TOKENS[:64])
    assert_close(llama_cpp_logits(out, TOKENS[:64]), hf, f"falcon {style}: llama.cpp vs transformers", rel=FALCON_REL)


@pytest.mark.slow
@pytest.mark.parametrize(("model_type", "style"), [("RefinedWeb", "40b"), ("RefinedWebModel", "7b")])
def test_refinedweb_config_is_translated_as_data(model_type: str, style: str, smollm2_tokenizer_dir: Path, tmp_path: Path) -> None:
    model = build_tiny_falcon(tmp_path / "hf", smollm2_tokenizer_dir, max_position_embeddings=2048, **STYLES[style])
    rw = as_refinedweb(model, tmp_path / "rw", model_type)
    [want] = convert_hf_to_gguf(model, "f32", tmp_path / "hf.gguf", progress=False)
    [got] = convert_hf_to_gguf(rw, "f32", tmp_path / "rw.gguf", progress=False)
    skip = ("general.name", "general.basename", "general.size_label", "GGUF.")
    want_fields = {k: v for k, v in gguf_fields(want).items() if not k.startswith(skip)}
    assert {k: v for k, v in gguf_fields(got).items() if not k.startswith(skip)} == want_fields
    assert [(t.name, t.data.tobytes()) for t in gguf.GGUFReader(got).tensors] == [
        (t.name, t.data.tobytes()) for t in gguf.GGUFReader(want).tensors
    ]
    assert_close(llama_cpp_logits(got, TOKENS[:64]), transformers_logits(model, TOKENS[:64]), f"{model_type}", rel=FALCON_REL)


def test_refinedweb_ntk_scaling_factor_becomes_ntk_yarn(smollm2_tokenizer_dir: Path, tmp_path: Path) -> None:
    model = build_tiny_falcon(tmp_path / "hf", smollm2_tokenizer_dir, **STYLES["40b"])
    rw = as_refinedweb(model, tmp_path / "rw", "RefinedWeb", ntk_scaling_factor=4)
    [out] = convert_hf_to_gguf(rw, "f32", tmp_path / "rw.gguf", progress=False)
    fields = gguf_fields(out)
    assert fields["falcon.context_length"] == 8192
    assert fields["falcon.rope.freq_base"] == np.float32(10000 * 5 ** (16 / 14))
    assert fields["falcon.rope.scaling.type"] == "none"
    assert fields["falcon.rope.scaling.attn_factor"] == np.float32(1 + 0.1 * math.log(4))


@pytest.mark.parametrize(("override", "message"), [({"alibi": True}, "ALiBi"), ({"bias": True}, "biases"),
                                                  ({"parallel_attn": False}, "parallel_attn")])
def test_unsupported_falcon_variants_exit_2(override: dict[str, Any], message: str, smollm2_tokenizer_dir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    model = build_tiny_falcon(tmp_path / "m", smollm2_tokenizer_dir, **override)
    out = tmp_path / "out.gguf"
    capsys.readouterr()
    assert cli_main(["convert", "hf-to-gguf", str(model), "--outfile", str(out), "--outtype", "f32"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.gguf.*"))


# ---- NTK-YaRN on a tiny Falcon-40B-style model: formula == transformers == llama.cpp


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def falcon40b_numpy_forward(model_dir: Path, tokens: list[int], inv_freq: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(final logits, layer-0 attention logits) of a new-decoder-architecture Falcon, float64, from the weights alone."""
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    w = {k: v.astype(np.float64) for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    n_head, n_kv, eps = cfg["num_attention_heads"], cfg["num_kv_heads"], cfg["layer_norm_epsilon"]
    dim, group, seq = cfg["hidden_size"] // n_head, n_head // n_kv, len(tokens)
    erf = np.vectorize(math.erf)
    mask = np.triu(np.full((seq, seq), -np.inf), 1)
    h = w["transformer.word_embeddings.weight"][tokens]
    first = np.empty(0)
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        a = layer_norm(h, w[p + "ln_attn.weight"], w[p + "ln_attn.bias"], eps)
        m = layer_norm(h, w[p + "ln_mlp.weight"], w[p + "ln_mlp.bias"], eps)
        qkv = (a @ w[p + "self_attention.query_key_value.weight"].T).reshape(seq, n_kv, group + 2, dim)
        q = qkv[:, :, :group].reshape(seq, n_head, dim).transpose(1, 0, 2)  # head g*group + j
        k = np.repeat(qkv[:, :, group].transpose(1, 0, 2), group, 0)
        v = np.repeat(qkv[:, :, group + 1].transpose(1, 0, 2), group, 0)
        q, k = rotate(q, inv_freq, scale), rotate(k, inv_freq, scale)
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(dim)
        first = scores if i == 0 else first
        probs = np.exp(scores + mask - (scores + mask).max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = (probs @ v).transpose(1, 0, 2).reshape(seq, n_head * dim) @ w[p + "self_attention.dense.weight"].T
        up = m @ w[p + "mlp.dense_h_to_4h.weight"].T
        h = h + attn + (0.5 * up * (1 + erf(up / math.sqrt(2)))) @ w[p + "mlp.dense_4h_to_h.weight"].T
    out = layer_norm(h, w["transformer.ln_f.weight"], w["transformer.ln_f.bias"], eps)
    return out @ w.get("lm_head.weight", w["transformer.word_embeddings.weight"]).T, first


def falcon_transformers_scores(model_dir: Path, tokens: list[int]) -> np.ndarray:
    """Layer-0 attention logits from the model's own layer norm, fused QKV, head split and rotary embedding."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tokens])
    with torch.no_grad():
        layer = model.transformer.h[0]
        x = layer.ln_attn(model.transformer.word_embeddings(ids))
        q, k, _ = layer.self_attention._split_heads(layer.self_attention.query_key_value(x))
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = model.transformer.rotary_emb(x, torch.arange(len(tokens))[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        scores = q @ k.transpose(2, 3) / math.sqrt(layer.self_attention.head_dim)
    return scores[0].double().numpy()


def test_ntk_yarn_falcon40b_formula_transformers_llama_cpp(smollm2_tokenizer_dir: Path, tmp_path: Path) -> None:
    orig, s, dim = 64, 4.0, 16
    model = build_tiny_falcon(tmp_path / "m", smollm2_tokenizer_dir, max_position_embeddings=orig, **STYLES["40b"])
    out = tmp_path / "baked"
    assert cli_main(["bake", str(model), "--rope", "ntk-yarn", "--rope-factor", "4", "--out", str(out)]) == 0
    b_new, m = 10000.0 * (s + 1) ** (dim / (dim - 2)), 1 + 0.1 * math.log(s)
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"] == {"rope_type": "yarn", "factor": 1.0, "attention_factor": m,
                                         "original_max_position_embeddings": 256, "rope_theta": b_new}
    assert config["max_position_embeddings"] == 256 and config["new_decoder_architecture"] is True
    assert json.loads((out / BAKE_RECORD).read_text())["rope"]["method"] == "ntk-yarn"

    [gguf_path] = convert_hf_to_gguf(out, "f32", tmp_path / "m.gguf", progress=False)
    fields = gguf_fields(gguf_path)
    assert fields["falcon.rope.freq_base"] == np.float32(b_new) and fields["falcon.rope.scaling.attn_factor"] == np.float32(m)
    assert fields["falcon.rope.scaling.type"] == "none" and fields["falcon.context_length"] == 256

    # q and k each scaled by m (logits by m²), base b′: straight from the formula, in float64.
    inv_freq = plain_inv_freq(b_new, dim)
    ref_logits, ref_scores = falcon40b_numpy_forward(out, TOKENS, inv_freq, m)
    assert_close(falcon_transformers_scores(out, TOKENS), ref_scores, "falcon ntk-yarn layer-0 attention logits")
    hf_logits = transformers_logits(out, TOKENS)
    assert_close(hf_logits, ref_logits, "falcon ntk-yarn final logits", rel=1e-4)
    # llama.cpp honours rope.scaling.attn_factor in its falcon graph: no weight folding needed.
    assert_close(llama_cpp_logits(gguf_path, TOKENS), hf_logits, "falcon ntk-yarn: llama.cpp vs transformers", rel=FALCON_REL)
    # ... and each part of the method matters: without m, or with the old base, the logits are not these.
    assert max_rel_err(falcon40b_numpy_forward(out, TOKENS, inv_freq, 1.0)[0], ref_logits) > 10 * FALCON_REL
    _, plain_scores = falcon40b_numpy_forward(out, TOKENS, plain_inv_freq(10000.0, dim), m)
    assert max_rel_err(plain_scores, ref_scores) > 100 * FALCON_REL


def test_refinedweb_checkpoint_is_baked_into_a_transformers_falcon(smollm2_tokenizer_dir: Path, tmp_path: Path) -> None:
    """Alfred's route: a RefinedWeb-config Falcon-40B baked with NTK-YaRN loads in transformers (no remote code) and
    gives what the same weights with a transformers config give."""
    model = build_tiny_falcon(tmp_path / "hf", smollm2_tokenizer_dir, max_position_embeddings=2048, **STYLES["40b"])
    rw = as_refinedweb(model, tmp_path / "rw", "RefinedWeb")
    assert cli_main(["bake", str(rw), "--rope", "ntk-yarn", "--rope-factor", "4", "--out", str(tmp_path / "rw_baked")]) == 0
    assert cli_main(["bake", str(model), "--rope", "ntk-yarn", "--rope-factor", "4", "--out", str(tmp_path / "hf_baked")]) == 0
    got, want = (json.loads((tmp_path / name / "config.json").read_text()) for name in ("rw_baked", "hf_baked"))
    assert got["model_type"] == "falcon" and "auto_map" not in got and "n_head" not in got
    same = ("rope_parameters", "max_position_embeddings", "new_decoder_architecture", "num_kv_heads", "num_attention_heads")
    assert {k: got[k] for k in same} == {k: want[k] for k in same}
    assert json.loads((tmp_path / "rw_baked" / BAKE_RECORD).read_text())["config_translated_from"] == "RefinedWeb"
    tokens = TOKENS[:48]
    assert np.array_equal(transformers_logits(tmp_path / "rw_baked", tokens), transformers_logits(tmp_path / "hf_baked", tokens))


@pytest.mark.slow
def test_falcon_40b_imatrix_loads_in_llama_quantize(smollm2_tokenizer_dir: Path, tmp_path: Path) -> None:
    """The statistics pass on a Falcon-40B-style replica gives an imatrix llama.cpp's own llama-quantize uses."""
    import subprocess

    from families import falcon

    from quantmill.reference_tools import llama_cpp_tool

    binary = llama_cpp_tool("llama-quantize")
    if not binary.is_file():
        pytest.skip("llama-quantize is not built: run `bash scripts/llama_cpp_source.sh --build` (scripts/test.sh does)")
    model = falcon(tmp_path / "f40", smollm2_tokenizer_dir, "float32", new_decoder_architecture=True, num_kv_heads=2,
                   hidden_size=256)
    imatrix = tmp_path / "imatrix.gguf"
    assert cli_main(["calibrate", str(model), "--calib-samples", "4", "--calib-seqlen", "64", "--out", str(imatrix),
                     "--no-progress"]) == 0
    [f16] = convert_hf_to_gguf(model, "f16", tmp_path / "f16.gguf", progress=False)
    done = subprocess.run([str(binary), "--imatrix", str(imatrix), str(f16), str(tmp_path / "q.gguf"), "Q4_K_M", "2"],
                          capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-2000:]
    assert "loaded 8 importance matrix entries" in log  # 4 linears x 2 layers, by their GGUF names
    assert "imatrix datasets=['bundled']" in log
