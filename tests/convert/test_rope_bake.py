"""RoPE baking: each method's formula, transformers with the baked config.json and
llama.cpp with the baked GGUF must give the same attention logits and final logits.

The reference is an independent numpy implementation of each method's frequencies
(from the papers / model cards) and of the whole tiny llama forward pass, in float64.
The tiny model was "trained" on 64 positions and is extended 4x; sequences of 160
tokens reach well past the original context.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest

from quantmill.cli import main as cli_main
from quantmill.cli.bake import ROPE_CHOICES
from quantmill.convert.bake import BAKE_RECORD, bake_rope
from quantmill.convert.hf_to_gguf import convert_hf_to_gguf
from quantmill.convert.rope import RopeBase, bake_rope_config, rope_methods
from quantmill.errors import UnsupportedError, UserInputError

ORIG_CTX = 64
FACTOR = 4.0
SEQ = 160  # past ORIG_CTX, within ORIG_CTX * FACTOR
N_CTX = 256
TOKENS = [(37 * i + 11) % 1000 for i in range(SEQ)]
REL = 2e-5  # measured: about 1e-6 everywhere (float32 runtimes against the float64 formula)

# ---- the methods' formulas: (base, rotary dim, factor, original context, sequence length) -> (inv_freq, cos/sin scale)


def plain_inv_freq(base: float, dim: int) -> np.ndarray:
    return 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


def f_default(base: float, dim: int, s: float, orig: int, seq: int) -> tuple[np.ndarray, float]:
    return plain_inv_freq(base, dim), 1.0


def f_linear(base: float, dim: int, s: float, orig: int, seq: int) -> tuple[np.ndarray, float]:
    return plain_inv_freq(base, dim) / s, 1.0


def f_dynamic(base: float, dim: int, s: float, orig: int, seq: int) -> tuple[np.ndarray, float]:
    if seq > orig:
        base = base * (s * seq / orig - (s - 1)) ** (dim / (dim - 2))
    return plain_inv_freq(base, dim), 1.0


def f_yarn(base: float, dim: int, s: float, orig: int, seq: int) -> tuple[np.ndarray, float]:
    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times over the original context
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(dim_of(32)), 0), min(math.ceil(dim_of(1)), dim - 1)
    high = high + 0.001 if high == low else high
    keep = 1 - np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)  # 1: extrapolate (unchanged), 0: interpolate
    freq = plain_inv_freq(base, dim)
    return freq / s * (1 - keep) + freq * keep, 0.1 * math.log(s) + 1


def f_llama3(base: float, dim: int, s: float, orig: int, seq: int) -> tuple[np.ndarray, float]:
    low_ff, high_ff = 1.0, 4.0
    out = []
    for f in plain_inv_freq(base, dim):
        wavelen = 2 * math.pi / f
        if wavelen < orig / high_ff:
            out.append(f)
        elif wavelen > orig / low_ff:
            out.append(f / s)
        else:
            smooth = (orig / wavelen - low_ff) / (high_ff - low_ff)
            out.append((1 - smooth) * f / s + smooth * f)
    return np.array(out), 1.0


def f_ntk_yarn(base: float, dim: int, s: float, orig: int, seq: int) -> tuple[np.ndarray, float]:
    return plain_inv_freq(base * (s + 1) ** (dim / (dim - 2)), dim), 1 + 0.1 * math.log(s)


FORMULAS = {"linear": f_linear, "dynamic": f_dynamic, "yarn": f_yarn, "llama3": f_llama3, "ntk-yarn": f_ntk_yarn}

# ---- a numpy llama forward pass (float64) with a given RoPE


def rotate(x: np.ndarray, inv_freq: np.ndarray, scale: float) -> np.ndarray:
    """x: (heads, positions, dim) in HF's rotate-half layout."""
    angles = np.arange(x.shape[1])[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angles) * scale, np.sin(angles) * scale
    cos, sin = np.concatenate([cos, cos], -1), np.concatenate([sin, sin], -1)
    half = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin


def rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def numpy_forward(model_dir: Path, tokens: list[int], inv_freq: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(final logits, layer-0 attention logits q·k/√d before the mask)."""
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    w = {k: v.astype(np.float64) for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    n_head, n_kv, dim, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["rms_norm_eps"]
    seq = len(tokens)
    mask = np.triu(np.full((seq, seq), -np.inf), 1)
    h = w["model.embed_tokens.weight"][tokens]
    first_scores = np.empty(0)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms(h, w[p + "input_layernorm.weight"], eps)
        q = (x @ w[p + "self_attn.q_proj.weight"].T).reshape(seq, n_head, dim).transpose(1, 0, 2)
        k = (x @ w[p + "self_attn.k_proj.weight"].T).reshape(seq, n_kv, dim).transpose(1, 0, 2)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).reshape(seq, n_kv, dim).transpose(1, 0, 2)
        q, k = rotate(q, inv_freq, scale), rotate(k, inv_freq, scale)
        k, v = np.repeat(k, n_head // n_kv, 0), np.repeat(v, n_head // n_kv, 0)
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(dim)
        first_scores = scores if i == 0 else first_scores
        probs = np.exp(scores + mask - (scores + mask).max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        h = h + (probs @ v).transpose(1, 0, 2).reshape(seq, n_head * dim) @ w[p + "self_attn.o_proj.weight"].T
        x = rms(h, w[p + "post_attention_layernorm.weight"], eps)
        gate = x @ w[p + "mlp.gate_proj.weight"].T
        h = h + (gate / (1 + np.exp(-gate)) * (x @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    out = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return rms(h, w["model.norm.weight"], eps) @ out.T, first_scores


# ---- transformers and llama.cpp


def transformers_run(model_dir: Path, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(final logits, layer-0 attention logits from the model's own rotary embedding and q/k projections)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tokens])
    with torch.no_grad():
        logits = model(ids).logits[0].double().numpy()
        attn = model.model.layers[0].self_attn
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        shape = (1, len(tokens), -1, attn.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        cos, sin = model.model.rotary_emb(x, torch.arange(len(tokens))[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        scores = (q @ repeat_kv(k, attn.num_key_value_groups).transpose(2, 3)) * attn.scaling
    return logits, scores[0].double().numpy()


def llama_cpp_logits(path: Path, tokens: list[int], **kwargs: float) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=N_CTX, n_batch=N_CTX, logits_all=True, n_threads=2, type_k=0, type_v=0, verbose=False, **kwargs)
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    llm.close()
    return logits


def max_rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def assert_close(got: np.ndarray, want: np.ndarray, what: str, rel: float = REL) -> None:
    assert np.abs(want).max() > 0.1, f"{what}: degenerate reference"
    err = max_rel_err(got, want)
    assert err <= rel, f"{what}: max |Δ| / max |ref| = {err:.3g} > {rel}"


def gguf_rope_keys(path: Path) -> dict[str, object]:
    fields = gguf.GGUFReader(path).fields
    return {k: f.contents() for k, f in fields.items() if k.startswith("llama.rope.") or k == "llama.context_length"}


def expected_gguf_keys(record: dict[str, object]) -> dict[str, object]:
    keys = {k.format(arch="llama"): v for k, v in record["gguf_keys"].items()}  # type: ignore[union-attr]
    keys["llama.rope.dimension_count"] = 16
    return keys


@pytest.fixture
def tiny(make_tiny_llama: Callable[..., Path]) -> Path:
    return make_tiny_llama("sp", name="tiny_rope", max_position_embeddings=ORIG_CTX)


# ---- the Must-show: formula == transformers == llama.cpp, per method


@pytest.mark.parametrize("method", sorted(FORMULAS))
def test_formula_transformers_and_llama_cpp_agree(method: str, tiny: Path, tmp_path: Path) -> None:
    baked = bake_rope(tiny, method, FACTOR, tmp_path / "baked")
    record = json.loads((baked / BAKE_RECORD).read_text())["rope"]
    inv_freq, scale = FORMULAS[method](10000.0, 16, FACTOR, ORIG_CTX, SEQ)

    # 1. Attention logits of layer 0 and final logits: the formula vs transformers with the baked config.
    ref_logits, ref_scores = numpy_forward(baked, TOKENS, inv_freq, scale)
    hf_logits, hf_scores = transformers_run(baked, TOKENS)
    assert_close(hf_scores, ref_scores, f"{method}: layer-0 attention logits")
    assert_close(hf_logits, ref_logits, f"{method}: final logits")
    # ... and the check can fail: unscaled RoPE gives other attention logits past the original context.
    _, plain_scores = numpy_forward(baked, TOKENS, *f_default(10000.0, 16, FACTOR, ORIG_CTX, SEQ))
    assert max_rel_err(plain_scores[:, ORIG_CTX:], ref_scores[:, ORIG_CTX:]) > 100 * REL
    if scale != 1.0:  # the q/k scaling matters too (yarn, ntk-yarn): a runtime that dropped it would fail
        assert max_rel_err(numpy_forward(baked, TOKENS, inv_freq, 1.0)[0], ref_logits) > 100 * REL

    # 2. The GGUF carries exactly the recorded keys; llama.cpp gives transformers' logits.
    [out] = convert_hf_to_gguf(baked, "f32", tmp_path / "m.gguf", progress=False)
    keys = gguf_rope_keys(out)
    want = expected_gguf_keys(record)
    assert sorted(keys) == sorted(want)
    for key, value in want.items():
        got = keys[key]
        assert np.float32(got) == np.float32(value) if isinstance(value, float) else got == value, key
    assert ("rope_freqs.weight" in {t.name for t in gguf.GGUFReader(out).tensors}) == (method == "llama3")
    if method != "dynamic":
        assert_close(llama_cpp_logits(out, TOKENS), hf_logits, f"{method}: llama.cpp vs transformers")
        return
    # llama.cpp has no dynamic NTK: identical within the original context, unscaled RoPE past it,
    # and transformers' result at one sequence length when given that length's base.
    short = TOKENS[:ORIG_CTX]
    assert_close(llama_cpp_logits(out, short), transformers_run(baked, short)[0], "dynamic: llama.cpp within the original context")
    plain_logits, _ = numpy_forward(baked, TOKENS, *f_default(10000.0, 16, FACTOR, ORIG_CTX, SEQ))
    assert_close(llama_cpp_logits(out, TOKENS), plain_logits, "dynamic: llama.cpp past the original context runs unscaled RoPE")
    seq_base = 10000.0 * (FACTOR * SEQ / ORIG_CTX - FACTOR + 1) ** (16 / 14)
    assert_close(llama_cpp_logits(out, TOKENS, rope_freq_base=seq_base), hf_logits, "dynamic: llama.cpp with the length's base")


# ---- config.json contents


def test_ntk_yarn_figures_for_the_alfred_example() -> None:
    bake = bake_rope_config("ntk-yarn", RopeBase(10000.0, 64, 4.0, 2048))
    rope = bake.rope_parameters
    assert rope["rope_theta"] == pytest.approx(52664.434, abs=1e-3)
    assert rope["attention_factor"] == pytest.approx(1.1386294, abs=1e-7)
    assert rope["rope_type"] == "yarn" and rope["factor"] == 1.0
    assert rope["original_max_position_embeddings"] == bake.max_position_embeddings == 8192
    assert bake.gguf_keys["{arch}.rope.scaling.type"] == "none"
    assert bake.gguf_keys["{arch}.rope.scaling.attn_factor"] == rope["attention_factor"]
    assert bake.gguf_keys["{arch}.context_length"] == 8192


def test_ntk_yarn_alfred_figures_reach_llama_cpp(make_tiny_llama: Callable[..., Path], tmp_path: Path) -> None:
    """Head dim 64, base 10000, s = 4: the GGUF holds b' = 52664.434 and m = 1.1386294 and runs as transformers does."""
    model = make_tiny_llama("sp", name="d64", max_position_embeddings=ORIG_CTX, hidden_size=128, num_attention_heads=2, num_key_value_heads=2, head_dim=64)
    baked = bake_rope(model, "ntk-yarn", 4, tmp_path / "baked")
    [out] = convert_hf_to_gguf(baked, "f32", tmp_path / "m.gguf", progress=False)
    keys = gguf_rope_keys(out)
    assert keys["llama.rope.freq_base"] == np.float32(52664.434) and keys["llama.rope.scaling.attn_factor"] == np.float32(1.1386294)
    assert keys["llama.rope.scaling.type"] == "none" and keys["llama.context_length"] == 4 * ORIG_CTX
    inv_freq, scale = f_ntk_yarn(10000.0, 64, 4.0, ORIG_CTX, SEQ)
    hf_logits, hf_scores = transformers_run(baked, TOKENS)
    ref_logits, ref_scores = numpy_forward(baked, TOKENS, inv_freq, scale)
    assert_close(hf_scores, ref_scores, "D=64 layer-0 attention logits")
    assert_close(hf_logits, ref_logits, "D=64 final logits")
    assert_close(llama_cpp_logits(out, TOKENS), hf_logits, "D=64 llama.cpp vs transformers", rel=1e-4)  # measured 1.9e-5


@pytest.mark.parametrize("method", sorted(FORMULAS))
def test_legacy_fields_alone_give_the_same_rope(method: str, tiny: Path, tmp_path: Path) -> None:
    """Older readers see rope_theta + rope_scaling only; transformers must derive the same frequencies from them."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    baked = bake_rope(tiny, method, FACTOR, tmp_path / "baked")
    config = json.loads((baked / "config.json").read_text())
    assert config["rope_scaling"]["type"] == config["rope_parameters"]["rope_type"]
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    legacy = {k: v for k, v in config.items() if k != "rope_parameters"}
    current = {k: v for k, v in config.items() if k not in ("rope_scaling", "rope_theta")}
    x, pos = torch.zeros(1, SEQ, 64), torch.arange(SEQ)[None]
    cos_sin = [LlamaRotaryEmbedding(LlamaConfig(**c))(x, pos) for c in (legacy, current)]
    assert torch.equal(cos_sin[0][0], cos_sin[1][0]) and torch.equal(cos_sin[0][1], cos_sin[1][1])


def test_tensors_are_byte_identical_and_record_is_written(tiny: Path, tmp_path: Path) -> None:
    baked = bake_rope(tiny, "yarn", "4", tmp_path / "baked", original_context=48)
    for path in sorted(tiny.iterdir()):
        if path.name != "config.json":
            assert (baked / path.name).read_bytes() == path.read_bytes(), path.name
    config = json.loads((baked / "config.json").read_text())
    assert config["max_position_embeddings"] == 192
    assert config["rope_parameters"] == {"factor": 4.0, "original_max_position_embeddings": 48, "rope_theta": 10000.0, "rope_type": "yarn"}
    record = json.loads((baked / BAKE_RECORD).read_text())["rope"]
    assert (record["method"], record["factor"], record["original_context"], record["new_context"]) == ("yarn", 4.0, 48, 192)
    again = bake_rope(tiny, "yarn", 4.0, tmp_path / "again", original_context=48)
    assert (again / "config.json").read_bytes() == (baked / "config.json").read_bytes()
    assert (again / BAKE_RECORD).read_bytes() == (baked / BAKE_RECORD).read_bytes()


def test_llama3_parameters_are_baked(tiny: Path, tmp_path: Path) -> None:
    baked = bake_rope(tiny, "llama3", 8.0, tmp_path / "baked", params={"high_freq_factor": 2.0})
    rope = json.loads((baked / "config.json").read_text())["rope_parameters"]
    assert (rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]) == (1.0, 2.0, ORIG_CTX)
    assert json.loads((baked / BAKE_RECORD).read_text())["rope"]["params"] == {"high_freq_factor": 2.0, "low_freq_factor": 1.0}


def test_cli_choices_match_the_registry() -> None:
    assert list(ROPE_CHOICES) == rope_methods() == sorted(FORMULAS)


def test_cli_bakes(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert cli_main(["bake", str(tiny), "--rope", "ntk-yarn", "--rope-factor", "4", "--out", str(out)]) == 0
    rope = json.loads((out / "config.json").read_text())["rope_parameters"]
    assert rope["rope_theta"] == pytest.approx(10000.0 * 5 ** (16 / 14))
    assert capsys.readouterr().out.strip() == str(out)


# ---- bad input: one line, exit 2, nothing written


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rope", "wobbly", "--rope-factor", "4"], "dynamic, linear, llama3, ntk-yarn, yarn"),
        (["--rope", "ntk-yarn", "--rope-factor", "1"], "s > 1"),
        (["--rope", "ntk-yarn", "--rope-factor", "0.5"], "s > 1"),
        (["--rope", "linear", "--rope-factor", "0"], "above 0"),
        (["--rope", "linear", "--rope-factor", "-2"], "above 0"),
        (["--rope", "yarn", "--rope-factor", "four"], "not a number"),
        (["--rope", "yarn", "--rope-factor", "nan"], "finite"),
        (["--rope", "llama3", "--rope-factor", "8", "--rope-param", "beta=3"], "not a parameter of llama3"),
        (["--rope", "yarn", "--rope-factor", "4", "--original-context", "0"], "positive"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(
    args: list[str], message: str, tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert cli_main(["bake", str(tiny), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_missing_original_context_is_refused(tiny: Path, tmp_path: Path) -> None:
    config = json.loads((tiny / "config.json").read_text())
    del config["max_position_embeddings"]
    (tiny / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserInputError, match="--original-context"):
        bake_rope(tiny, "llama3", 8.0, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert json.loads((bake_rope(tiny, "llama3", 8.0, tmp_path / "out", 32) / "config.json").read_text())["max_position_embeddings"] == 256


def test_already_scaled_or_in_place_is_refused(tiny: Path, tmp_path: Path) -> None:
    baked = bake_rope(tiny, "linear", 2.0, tmp_path / "baked")
    with pytest.raises(UnsupportedError, match="already scaled"):
        bake_rope(baked, "yarn", 2.0, tmp_path / "twice")
    with pytest.raises(UserInputError, match="must not be the model directory"):
        bake_rope(tiny, "yarn", 2.0, tiny)
    with pytest.raises(UserInputError, match="above it"):
        bake_rope(tiny, "yarn", 2.0, tiny.parent)  # replacing the parent would delete the source
    assert (tiny / "model.safetensors").is_file()


def test_out_onto_an_unrelated_directory_is_refused(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """As merge does: an earlier bake output is replaced atomically, any other non-empty directory is left alone."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    capsys.readouterr()
    assert cli_main(["bake", str(tiny), "--rope", "linear", "--rope-factor", "2", "--out", str(precious)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not an earlier bake output" in err, err
    assert sorted(p.name for p in precious.iterdir()) == ["notes.txt"] and not list(tmp_path.glob(".precious.*"))
    assert cli_main(["bake", str(tiny), "--rope", "linear", "--rope-factor", "2", "--out", str(precious / "notes.txt")]) == 2
    assert "is a file" in capsys.readouterr().err and (precious / "notes.txt").read_text() == "keep me"
    again = tmp_path / "again"
    bake_rope(tiny, "linear", 2.0, again)
    bake_rope(tiny, "yarn", 2.0, again)  # an earlier bake output is replaced
    assert json.loads((again / "config.json").read_text())["rope_parameters"]["rope_type"] == "yarn"
