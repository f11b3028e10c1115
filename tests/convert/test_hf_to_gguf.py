"""quantmill's HF → GGUF converter on tiny random llama checkpoints.

Checks real artifacts: the GGUF read back with gguf's reader, loaded and run by
llama-cpp-python and compared with transformers' logits on the same weights.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

from quantmill.convert.arch.llama import llama3_rope_factors
from quantmill.convert.hf_to_gguf import convert_hf_to_gguf, parse_split_size
from quantmill.convert.naming import ModelNaming, size_label
from quantmill.convert.vocab_pre import PRE_BY_HASH, PROBE_TEXT, probe_hash
from quantmill.errors import UnsupportedError, UserInputError

N_HEAD, N_KV = 4, 2
TOKENS = [1, 17, 250, 9, 31, 400, 77, 5, 123, 64, 2, 300, 11, 12, 13, 99]
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf_name: str) -> str:
    """The GGUF name of a llama tensor, spelled out independently of the converter's tables."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, suffix = rest.rsplit(".", 1)
    return f"blk.{layer}.{LAYER_NAMES[module]}.{suffix}"


def llama_cpp_layout(hf_name: str, array: np.ndarray) -> np.ndarray:
    """HF weights as llama.cpp stores them: Q/K rows regrouped from rotate-half to interleaved pairs."""
    heads = N_HEAD if ".q_proj." in hf_name else N_KV if ".k_proj." in hf_name else 0
    if not heads:
        return array
    half = array.shape[0] // heads // 2
    out = np.empty_like(array)
    for h in range(heads):
        block = array[h * 2 * half:(h + 1) * 2 * half]
        out[h * 2 * half:(h + 1) * 2 * half][0::2] = block[:half]
        out[h * 2 * half:(h + 1) * 2 * half][1::2] = block[half:]
    return out


def hf_weights(model_dir: Path) -> dict[str, np.ndarray]:
    weights: dict[str, np.ndarray] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(str(path)))
    return weights


def gguf_tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


_READERS: dict[tuple[Path, float], gguf.GGUFReader] = {}


def gguf_field(path: Path, key: str) -> object:
    """One metadata value (readers are cached per file version: parsing a 49k-token vocabulary takes a while)."""
    cache_key = (path, path.stat().st_mtime)
    if cache_key not in _READERS:
        _READERS[cache_key] = gguf.GGUFReader(path)
    return _READERS[cache_key].fields[key].contents()


def llama_cpp_logits(path: Path, tokens: list[int]) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=128, n_batch=128, logits_all=True, n_threads=2, type_k=0, type_v=0, verbose=False)
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    llm.close()
    return logits


def transformers_logits(model_dir: Path, tokens: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def assert_logits_close(got: np.ndarray, want: np.ndarray, rel: float) -> None:
    scale = float(np.abs(want).max())
    assert scale > 0.1, "degenerate reference logits"
    err = float(np.abs(got - want).max())
    assert err <= rel * scale, f"max |Δlogit| {err:.3g} > {rel} × {scale:.3g}"
    assert np.array_equal(got.argmax(-1), want.argmax(-1))


# ---- tensors read back exactly ------------------------------------------------------------

def test_f32_gives_back_every_tensor_exactly(tiny_bpe_llama: Path, tmp_path: Path) -> None:
    [out] = convert_hf_to_gguf(tiny_bpe_llama, "f32", tmp_path / "m.gguf", progress=False)
    tensors = gguf_tensors(out)
    weights = hf_weights(tiny_bpe_llama)
    assert sorted(tensors) == sorted(gguf_name(n) for n in weights)
    for name, array in weights.items():
        t = tensors[gguf_name(name)]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert tuple(int(d) for d in reversed(t.shape)) == array.shape
        assert np.array_equal(np.asarray(t.data).reshape(array.shape), llama_cpp_layout(name, array)), name


def test_f16_matches_numpy_cast_and_norms_stay_f32(tiny_sp_llama: Path, tmp_path: Path) -> None:
    [out] = convert_hf_to_gguf(tiny_sp_llama, "f16", tmp_path / "m.gguf", progress=False)
    tensors = gguf_tensors(out)
    for name, array in hf_weights(tiny_sp_llama).items():
        t = tensors[gguf_name(name)]
        want = llama_cpp_layout(name, array)
        if array.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            assert np.array_equal(np.asarray(t.data), want)
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16
            assert np.array_equal(np.asarray(t.data).reshape(array.shape).view(np.uint16), want.astype(np.float16).view(np.uint16))


def test_bf16_rounds_like_torch_and_q8_0_stays_within_half_a_step(tiny_sp_llama: Path, tmp_path: Path) -> None:
    import torch

    [bf16] = convert_hf_to_gguf(tiny_sp_llama, "bf16", tmp_path / "bf16.gguf", progress=False)
    [q8] = convert_hf_to_gguf(tiny_sp_llama, "q8_0", tmp_path / "q8.gguf", progress=False)
    as_bf16, as_q8 = gguf_tensors(bf16), gguf_tensors(q8)
    for name, array in hf_weights(tiny_sp_llama).items():
        if array.ndim == 1:
            continue
        want = llama_cpp_layout(name, array)
        got_bf16 = np.asarray(as_bf16[gguf_name(name)].data).view(np.int16).reshape(want.shape)
        assert np.array_equal(got_bf16, torch.from_numpy(want).to(torch.bfloat16).view(torch.int16).numpy())
        t = as_q8[gguf_name(name)]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
        back = gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType.Q8_0).reshape(want.shape)
        blocks, err = want.reshape(-1, 32), np.abs(back - want).reshape(-1, 32)
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127  # the scale is stored as f16: allow its rounding
        assert np.all(err <= step * 0.5 + 127 * step * 2.0**-11 + 1e-7)


# ---- llama.cpp runs the result like transformers ------------------------------------------

@pytest.mark.parametrize(("fixture", "outtype", "rel"), [("tiny_bpe_llama", "f32", 1e-4), ("tiny_bpe_llama", "f16", 2e-2), ("tiny_sp_llama", "f32", 1e-4)])
def test_llama_cpp_logits_match_transformers(fixture: str, outtype: str, rel: float, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    model_dir: Path = request.getfixturevalue(fixture)
    [out] = convert_hf_to_gguf(model_dir, outtype, tmp_path / "m.gguf", progress=False)
    tokens = TOKENS if fixture == "tiny_bpe_llama" else [t % 1000 for t in TOKENS]
    assert_logits_close(llama_cpp_logits(out, tokens), transformers_logits(model_dir, tokens), rel)


def test_sentencepiece_vocabulary_keys(tiny_sp_llama: Path, tmp_path: Path) -> None:
    import sentencepiece as spm

    [out] = convert_hf_to_gguf(tiny_sp_llama, "f16", tmp_path / "m.gguf", progress=False)
    sp = spm.SentencePieceProcessor(model_file=str(tiny_sp_llama / "tokenizer.model"))
    assert gguf_field(out, "tokenizer.ggml.model") == "llama"
    assert gguf_field(out, "tokenizer.ggml.pre") == "default"
    tokens = gguf_field(out, "tokenizer.ggml.tokens")
    assert tokens == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    types = gguf_field(out, "tokenizer.ggml.token_type")
    assert types[0] == 2 and types[1] == 3 and types[2] == 3 and types[3] == 6  # unk, bos, eos, first byte
    assert gguf_field(out, "tokenizer.ggml.add_bos_token") is True
    assert gguf_field(out, "tokenizer.ggml.bos_token_id") == 1


def test_bpe_vocabulary_resolves_smollm_pre_tokenizer(tiny_bpe_llama: Path, tmp_path: Path) -> None:
    [out] = convert_hf_to_gguf(tiny_bpe_llama, "f16", tmp_path / "m.gguf", progress=False)
    assert gguf_field(out, "tokenizer.ggml.model") == "gpt2"
    assert gguf_field(out, "tokenizer.ggml.pre") == "smollm"
    assert len(gguf_field(out, "tokenizer.ggml.merges")) == 48900
    assert gguf_field(out, "tokenizer.ggml.add_bos_token") is False
    assert gguf_field(out, "tokenizer.chat_template").startswith("{% for message in messages %}")


def test_probe_hash_of_smollm2_tokenizer(tiny_bpe_llama: Path) -> None:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tiny_bpe_llama / "tokenizer.json")).encode(PROBE_TEXT).ids
    assert PRE_BY_HASH[probe_hash(ids)][0] == "smollm"
    assert probe_hash([]) == "4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945"  # sha256 of "[]"


def test_sentencepiece_style_tokenizer_json_without_model_file_is_refused(make_tiny_llama: Callable[..., Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    model_dir = make_tiny_llama("sp")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(model_dir)
    (model_dir / "tokenizer.model").unlink()
    with pytest.raises(UnsupportedError, match="tokenizer.model"):
        convert_hf_to_gguf(model_dir, "f16", tmp_path / "m.gguf", progress=False)
    assert not (tmp_path / "m.gguf").exists()


# ---- RoPE, other family members ------------------------------------------------------------

def torch_llama3_factors(base: float, dim: int, factor: float, low: float, high: float, old_ctx: int) -> np.ndarray:
    """llama.cpp's rope_freqs recipe, evaluated with torch float32 arithmetic as its converter does."""
    import math

    import torch

    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    out: list[object] = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).numpy()


@pytest.mark.parametrize(
    ("base", "dim", "factor", "old_ctx"),
    [(500000.0, 128, 8.0, 8192), (500000.0, 64, 32.0, 8192), (500000.0, 128, 32.0, 8192), (10000.0, 128, 8.0, 4096), (500000.0, 32, 8.0, 1024)],
)
def test_llama3_rope_factors_are_bit_identical_to_llama_cpp_recipe(base: float, dim: int, factor: float, old_ctx: int) -> None:
    """Llama 3.1 (8x) and 3.2 (32x) settings among them."""
    rope = {"rope_theta": base, "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": old_ctx}
    ours = llama3_rope_factors(rope, dim)
    assert ours.dtype == np.float32 and ours.shape == (dim // 2,)
    assert np.array_equal(ours.view(np.uint32), torch_llama3_factors(base, dim, factor, 1.0, 4.0, old_ctx).view(np.uint32))


def test_llama3_rope_scaling_becomes_rope_freqs_and_matches_transformers(make_tiny_llama: Callable[..., Path], tmp_path: Path) -> None:
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model_dir = make_tiny_llama("sp", rope_parameters={**rope, "rope_theta": 500000.0})
    [out] = convert_hf_to_gguf(model_dir, "f32", tmp_path / "m.gguf", progress=False)
    freqs = np.asarray(gguf_tensors(out)["rope_freqs.weight"].data)
    assert np.array_equal(freqs, llama3_rope_factors({**rope, "rope_theta": 500000.0}, 16))
    assert freqs.min() == 1.0 and freqs.max() == 8.0
    tokens = [(7 * i + 3) % 1000 for i in range(100)]
    assert_logits_close(llama_cpp_logits(out, tokens), transformers_logits(model_dir, tokens), 1e-4)


def test_linear_rope_scaling_keys(make_tiny_llama: Callable[..., Path], tmp_path: Path) -> None:
    model_dir = make_tiny_llama("sp", rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    [out] = convert_hf_to_gguf(model_dir, "f32", tmp_path / "m.gguf", progress=False)
    assert gguf_field(out, "llama.rope.scaling.type") == "linear"
    assert gguf_field(out, "llama.rope.scaling.factor") == 4.0
    tokens = [(5 * i + 1) % 1000 for i in range(40)]
    assert_logits_close(llama_cpp_logits(out, tokens), transformers_logits(model_dir, tokens), 1e-4)


def test_unknown_rope_type_is_refused(make_tiny_llama: Callable[..., Path], tmp_path: Path) -> None:
    model_dir = make_tiny_llama("sp")
    config = json.loads((model_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "wobbly", "rope_theta": 10000.0}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedError, match="wobbly"):
        convert_hf_to_gguf(model_dir, "f16", tmp_path / "m.gguf", progress=False)


def test_mistral_converts_as_llama(make_tiny_llama: Callable[..., Path], tmp_path: Path) -> None:
    model_dir = make_tiny_llama("sp", architecture="mistral", sliding_window=4096)
    [out] = convert_hf_to_gguf(model_dir, "f32", tmp_path / "m.gguf", progress=False)
    assert gguf_field(out, "general.architecture") == "llama"
    assert_logits_close(llama_cpp_logits(out, TOKENS), transformers_logits(model_dir, TOKENS), 1e-4)


def test_longllama_config_converts_as_plain_llama(make_tiny_llama: Callable[..., Path], tmp_path: Path) -> None:
    model_dir = make_tiny_llama("sp")
    plain = convert_hf_to_gguf(model_dir, "f32", tmp_path / "plain.gguf", progress=False)[0]
    config = json.loads((model_dir / "config.json").read_text())
    config.update(
        architectures=["LongLlamaForCausalLM"], model_type="longllama", mem_layers=[1], mem_dtype="bfloat16",
        last_context_length=1024, mem_attention_grouping=None, torch_attention=False, gradient_checkpoint_every_ith=1,
    )
    (model_dir / "config.json").write_text(json.dumps(config))
    [long] = convert_hf_to_gguf(model_dir, "f32", tmp_path / "long.gguf", progress=False)
    # The Focused-Transformer fields are kept as metadata: typed keys, and all of them verbatim in longllama.config.
    fields = {k: f.contents() for k, f in gguf.GGUFReader(long).fields.items() if k.startswith("longllama.")}
    fot = {"mem_layers": [1], "mem_dtype": "bfloat16", "last_context_length": 1024, "mem_attention_grouping": None,
           "torch_attention": False, "gradient_checkpoint_every_ith": 1}
    assert json.loads(fields.pop("longllama.config")) == fot
    assert fields == {f"longllama.{k}": v for k, v in fot.items() if v is not None}
    assert not any(k.startswith("longllama.") for k in gguf.GGUFReader(plain).fields)
    a, b = gguf_tensors(plain), gguf_tensors(long)
    assert a.keys() == b.keys()
    assert all(np.array_equal(np.asarray(a[n].data), np.asarray(b[n].data)) for n in a)
    assert_logits_close(llama_cpp_logits(long, [t % 1000 for t in TOKENS]), llama_cpp_logits(plain, [t % 1000 for t in TOKENS]), 1e-6)


# ---- sharded input, split output, naming ----------------------------------------------------

def test_sharded_input_gives_the_same_tensors(make_tiny_llama: Callable[..., Path], tmp_path: Path) -> None:
    single = make_tiny_llama("bpe", name="single", seed=3)
    sharded = make_tiny_llama("bpe", name="sharded", seed=3, max_shard_size="2MB")
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    a = gguf_tensors(convert_hf_to_gguf(single, "q8_0", tmp_path / "a.gguf", progress=False)[0])
    b = gguf_tensors(convert_hf_to_gguf(sharded, "q8_0", tmp_path / "b.gguf", progress=False)[0])
    assert a.keys() == b.keys()
    for name in a:
        assert bytes(np.asarray(a[name].data).view(np.uint8)) == bytes(np.asarray(b[name].data).view(np.uint8)), name


def test_split_output_loads_in_llama_cpp(tiny_bpe_llama: Path, tmp_path: Path) -> None:
    [whole] = convert_hf_to_gguf(tiny_bpe_llama, "f32", tmp_path / "whole.gguf", progress=False)
    parts = convert_hf_to_gguf(tiny_bpe_llama, "f32", tmp_path / "split" / "m.gguf", split_max_size=parse_split_size("100K"), progress=False)
    assert [p.name for p in parts] == [f"m-{i:05d}-of-{len(parts):05d}.gguf" for i in range(1, len(parts) + 1)]
    assert len(parts) >= 3
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == [p.name for p in parts]  # nothing else left
    n_tensors = len(gguf_tensors(whole))
    for i, part in enumerate(parts):
        assert gguf_field(part, "split.no") == i
        assert gguf_field(part, "split.count") == len(parts)
        assert gguf_field(part, "split.tensors.count") == n_tensors
    assert sum(len(gguf_tensors(p)) for p in parts) == n_tensors
    assert np.array_equal(llama_cpp_logits(parts[0], TOKENS), llama_cpp_logits(whole, TOKENS))


def test_default_file_name_follows_the_naming_convention(make_tiny_llama: Callable[..., Path]) -> None:
    """Name parts come from the directory name (as llama.cpp reads them), the size label from the tensors."""
    model_dir = make_tiny_llama("sp", name="TinyLlama-Chat-v1.0")
    [out] = convert_hf_to_gguf(model_dir, "q8_0", progress=False)
    assert out == model_dir / "TinyLlama-202K-Chat-v1.0-Q8_0.gguf"
    assert gguf_field(out, "general.size_label") == "202K"
    assert gguf_field(out, "general.basename") == "TinyLlama"
    [out] = convert_hf_to_gguf(model_dir, "bf16", model_dir.parent, progress=False)
    assert out == model_dir.parent / "TinyLlama-202K-Chat-v1.0-BF16.gguf"
    [out] = convert_hf_to_gguf(model_dir, "f16", model_dir.parent / "custom-{ftype}.gguf", progress=False)
    assert out.name == "custom-f16.gguf" and out.is_file()


@pytest.mark.parametrize("n", [0, 999, 1000, 135_000_000, 202_240, 1_100_048_384, 3_212_749_824, 7_241_732_096, 70_553_706_496, 1_500_000_000_000])
def test_size_label_matches_gguf(n: int) -> None:
    assert size_label(n) == gguf.size_label(n, n, 0, 0)
    assert size_label(n, n // 4, n // 8, 8) == gguf.size_label(n, n // 4, n // 8, 8)


def test_file_name_matches_gguf_naming_convention() -> None:
    cases = [("Llama 3", None, "8B", "Instruct", "v3.1", "Q8_0"), (None, None, None, None, None, "f16"), ("x/y", "Base Name", "1.1B", None, None, None)]
    for name, base, size, finetune, version, kind in cases:
        ours = ModelNaming(name, base, size, finetune, version).stem(kind)
        assert ours == gguf.naming_convention(name, base, finetune, version, size, kind)


# ---- bad input: one-line errors, exit code 2, nothing left behind --------------------------

def run_cli(*args: str) -> int:
    from quantmill.cli import main

    return main(["convert", "hf-to-gguf", *args])


def assert_user_error(capsys: pytest.CaptureFixture[str], code: int, *needles: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    line = [ln for ln in err.splitlines() if ln.startswith("quantmill: error:") or ln.startswith("Error:")]
    assert line, err
    for needle in needles:
        assert needle in err, err


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_user_error(capsys, run_cli(str(tmp_path / "nope"), "--outtype", "f16"), str(tmp_path / "nope"), "no such model directory")


def test_unsupported_architecture(tiny_sp_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = copy_model(tiny_sp_llama, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (model / "config.json").write_text(json.dumps(config))
    code = run_cli(str(model), "--outtype", "f16", "--outfile", str(tmp_path / "o.gguf"))
    assert_user_error(capsys, code, str(model / "config.json"), "GPT2LMHeadModel", "LlamaForCausalLM")
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("damage", ["truncate", "lie"])
def test_broken_safetensors(tiny_sp_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str) -> None:
    model = copy_model(tiny_sp_llama, tmp_path / "m")
    weights = model / "model.safetensors"
    blob = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(blob[: len(blob) // 2])
    else:  # claim a shape larger than the stored data, keeping the header length
        n = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + n])
        name = sorted(k for k in header if k != "__metadata__")[0]
        header[name]["shape"][0] *= 2
        text = json.dumps(header).encode()
        weights.write_bytes(len(text).to_bytes(8, "little") + text + blob[8 + n :])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code = run_cli(str(model), "--outtype", "q8_0", "--outfile", str(out_dir / "o.gguf"))
    assert_user_error(capsys, code, str(weights))
    assert list(out_dir.iterdir()) == []


def test_output_directory_not_writable(tiny_sp_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert_user_error(capsys, run_cli(str(tiny_sp_llama), "--outtype", "f16", "--outfile", str(blocker / "sub" / "o.gguf")), str(blocker))


def test_failure_while_writing_leaves_nothing(tiny_bpe_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from quantmill.convert import tensor_stream

    calls = {"n": 0}
    real = tensor_stream.encode_rows

    def failing(*args: object) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return real(*args)

    monkeypatch.setattr(tensor_stream, "encode_rows", failing)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(UserInputError, match="the disk is full"):
        convert_hf_to_gguf(tiny_bpe_llama, "q8_0", out_dir / "o.gguf", progress=False)
    assert list(out_dir.iterdir()) == []


def test_tokenizer_with_only_special_tokens(tiny_bpe_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = copy_model(tiny_bpe_llama, tmp_path / "m")
    data = json.loads((model / "tokenizer.json").read_text())
    data["model"]["vocab"] = {t["content"]: t["id"] for t in data["added_tokens"][:3]}
    data["model"]["merges"] = []
    data["added_tokens"] = data["added_tokens"][:3]
    (model / "tokenizer.json").write_text(json.dumps(data))
    code = run_cli(str(model), "--outtype", "f16", "--outfile", str(tmp_path / "o.gguf"))
    assert_user_error(capsys, code, str(model / "tokenizer.json"), "defines 3 tokens", "49152 rows")
    assert not (tmp_path / "o.gguf").exists()


def test_unknown_bpe_pre_tokenizer_needs_vocab_pre(tiny_bpe_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = copy_model(tiny_bpe_llama, tmp_path / "m")
    data = json.loads((model / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    (model / "tokenizer.json").write_text(json.dumps(data))
    out = tmp_path / "o.gguf"
    assert_user_error(capsys, run_cli(str(model), "--outtype", "f16", "--outfile", str(out)), "--vocab-pre", "not recognised")
    assert not out.exists()
    assert_user_error(capsys, run_cli(str(model), "--outtype", "f16", "--outfile", str(out), "--vocab-pre", "nonsense"), "nonsense")
    assert run_cli(str(model), "--outtype", "f16", "--outfile", str(out), "--vocab-pre", "gpt-2") == 0
    assert gguf_field(out, "tokenizer.ggml.pre") == "gpt-2"


@pytest.mark.parametrize("args", [["--outtype", "q4_k"], ["--outtype", "f16", "--split-max-size", "lots"]])
def test_bad_options(tiny_sp_llama: Path, capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    assert run_cli(str(tiny_sp_llama), *args) == 2
    assert capsys.readouterr().err.strip()
