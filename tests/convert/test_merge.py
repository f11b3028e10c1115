"""``quantmill merge``: merged tensors equal PEFT's merge_and_unload on adapters trained here.

Every adapter is trained for a few deterministic steps with PEFT on a tiny random llama
(or GPT-2 for fan_in_fan_out); the reference is PEFT's own merge, loaded back through
transformers; the bound is 1e-6 absolute in float32.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import build_tiny_llama
from merge_helpers import load_model, logits, max_state_diff, peft_logits, peft_merge, token_batch, train_adapter

from quantmill.cli import main
from quantmill.convert.merge import bnb
from quantmill.convert.merge.adapter import parse_adapter_spec, pattern_key
from quantmill.convert.merge.merge import METADATA_NAME, merge_adapters
from quantmill.errors import InputFileError, UnsupportedError, UserInputError

TOL = 1e-6
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 1000


@pytest.fixture(scope="module")
def untied_base(tmp_path_factory: pytest.TempPathFactory, sentencepiece_tokenizer_dir: Path) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("untied_base"), sentencepiece_tokenizer_dir, VOCAB, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory: pytest.TempPathFactory, sentencepiece_tokenizer_dir: Path) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tied_base"), sentencepiece_tokenizer_dir, VOCAB, tie_word_embeddings=True, seed=1)


@pytest.fixture(scope="module")
def bias_base(tmp_path_factory: pytest.TempPathFactory, sentencepiece_tokenizer_dir: Path) -> Path:
    return build_tiny_llama(
        tmp_path_factory.mktemp("bias_base"), sentencepiece_tokenizer_dir, VOCAB, tie_word_embeddings=False, attention_bias=True, mlp_bias=True, seed=2
    )


def merge_one(base: Path, adapter: Path, out: Path, **kwargs: Any) -> Path:
    merge_adapters(base, [(adapter, 1.0)], out, progress=False, **kwargs)
    return out


CASES: dict[str, dict[str, Any]] = {
    "plain": {"r": 4, "lora_alpha": 8, "target_modules": ALL_LINEAR},
    "rslora": {"r": 8, "lora_alpha": 4, "use_rslora": True, "target_modules": ALL_LINEAR},
    "dora": {"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": ALL_LINEAR + ["embed_tokens"]},
    "embeddings_lm_head": {"r": 4, "lora_alpha": 16, "target_modules": ["embed_tokens", "lm_head", "q_proj", "v_proj"]},
    "modules_to_save": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head", "embed_tokens"]},
    "rank_alpha_pattern": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ALL_LINEAR,
        "rank_pattern": {"q_proj": 2, "layers.1.self_attn.v_proj": 6, r"model\.layers\.0\.mlp\.(up|down)_proj": 3},
        "alpha_pattern": {"o_proj": 3, "layers.0.mlp.gate_proj": 32},
    },
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_equals_peft(case: str, untied_base: Path, tmp_path: Path) -> None:
    adapter = train_adapter(untied_base, tmp_path / "adapter", **CASES[case])
    merged = merge_one(untied_base, adapter, tmp_path / "merged")
    diff = max_state_diff(merged, peft_merge(untied_base, [(adapter, 1.0)]))
    print(f"{case}: max |quantmill - peft merge_and_unload| = {diff:.3g}")
    assert diff <= TOL
    # and the update is real: the merged model differs from the base
    assert max_state_diff(merged, load_model(untied_base)) > 1e-3


def test_rank_pattern_uses_peft_key_matching() -> None:
    patterns = {"q_proj": 2, r"layers\.1\..*v_proj": 6}
    assert pattern_key(patterns, "model.layers.0.self_attn.q_proj") == "q_proj"
    assert pattern_key(patterns, "model.layers.1.self_attn.v_proj") == r"layers\.1\..*v_proj"
    assert pattern_key(patterns, "model.layers.0.self_attn.v_proj") is None
    assert pattern_key({"proj": 1}, "model.layers.0.self_attn.q_proj") is None  # whole dotted components only


def test_lora_bias_and_saved_biases_replace(bias_base: Path, tmp_path: Path) -> None:
    lora_bias = train_adapter(bias_base, tmp_path / "lora_bias", r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], lora_bias=True)
    trained_bias = train_adapter(bias_base, tmp_path / "bias_all", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="all")
    for adapter in (lora_bias, trained_bias):
        merged = merge_one(bias_base, adapter, tmp_path / f"merged_{adapter.name}")
        assert max_state_diff(merged, peft_merge(bias_base, [(adapter, 1.0)])) <= TOL
    base_bias = load_model(bias_base).state_dict()["model.layers.0.self_attn.k_proj.bias"]
    merged_bias = load_model(tmp_path / "merged_bias_all").state_dict()["model.layers.0.self_attn.k_proj.bias"]
    assert float((merged_bias - base_bias).abs().max()) > 1e-3  # a trained bias of a non-LoRA layer is replaced


def test_two_weighted_adapters_match_sequential_peft_merges(untied_base: Path, tmp_path: Path) -> None:
    first = train_adapter(untied_base, tmp_path / "first", seed=1, r=4, lora_alpha=8, target_modules=ALL_LINEAR)
    second = train_adapter(untied_base, tmp_path / "second", seed=2, r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])
    merged = tmp_path / "merged"
    merge_adapters(untied_base, [(first, 0.7), (second, 0.5)], merged, progress=False)
    diff = max_state_diff(merged, peft_merge(untied_base, [(first, 0.7), (second, 0.5)]))
    print(f"lora x0.7 then dora x0.5: max diff vs sequential PEFT merges = {diff:.3g}")
    assert diff <= TOL
    meta = json.loads((merged / METADATA_NAME).read_text())
    assert [(a["weight"], a["method"]) for a in meta["adapters"]] == [(0.7, "lora"), (0.5, "dora")]


def test_two_plain_adapters_equal_peft_cat_combination(untied_base: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    first = train_adapter(untied_base, tmp_path / "first", seed=1, r=4, lora_alpha=8, target_modules=ALL_LINEAR)
    second = train_adapter(untied_base, tmp_path / "second", seed=2, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])
    merged = tmp_path / "merged"
    merge_adapters(untied_base, [(first, 0.7), (second, -0.5)], merged, progress=False)
    peft_model = PeftModel.from_pretrained(load_model(untied_base), first, adapter_name="first")
    peft_model.load_adapter(second, adapter_name="second")
    peft_model.add_weighted_adapter(["first", "second"], [0.7, -0.5], "both", combination_type="cat")
    peft_model.set_adapter("both")
    reference = peft_model.merge_and_unload(adapter_names=["both"])
    diff = max_state_diff(merged, reference)
    print(f"0.7*first - 0.5*second vs add_weighted_adapter(cat): {diff:.3g}")
    assert diff <= TOL


def test_fan_in_fan_out_gpt2(tmp_path: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=120, n_positions=64, n_embd=32, n_layer=2, n_head=4)).save_pretrained(tmp_path / "gpt2")
    for use_dora in (False, True):
        adapter = train_adapter(
            tmp_path / "gpt2", tmp_path / f"adapter{use_dora}", r=4, lora_alpha=8, fan_in_fan_out=True, use_dora=use_dora,
            target_modules=["c_attn", "c_proj", "c_fc"],
        )
        merged = merge_one(tmp_path / "gpt2", adapter, tmp_path / f"merged{use_dora}")
        assert max_state_diff(merged, peft_merge(tmp_path / "gpt2", [(adapter, 1.0)])) <= TOL


def test_tied_embeddings_untied_when_adapter_changes_them_differently(tied_base: Path, tmp_path: Path) -> None:
    adapter = train_adapter(tied_base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"])
    merged = merge_one(tied_base, adapter, tmp_path / "merged")
    config = json.loads((merged / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    # PEFT's advice for tied models: untie first, then merge_and_unload; that is also what the adapter computes
    assert max_state_diff(merged, peft_merge(tied_base, [(adapter, 1.0)], untied=True)) <= TOL
    ids = token_batch(VOCAB, seed=5)
    assert float((logits(load_model(merged), ids) - peft_logits(tied_base, adapter, ids)).abs().max()) < 1e-4


def test_tied_embeddings_stay_tied(tied_base: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    plain = train_adapter(tied_base, tmp_path / "plain", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    tied_lora = train_adapter(tied_base, tmp_path / "tied", r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head"], ensure_weight_tying=True)
    ids = token_batch(VOCAB, seed=5)
    for adapter in (plain, tied_lora):
        merged = merge_one(tied_base, adapter, tmp_path / f"merged_{adapter.name}")
        with safe_open(str(merged / "model.safetensors"), "pt") as handle:
            assert "lm_head.weight" not in handle.keys()
        assert json.loads((merged / METADATA_NAME).read_text())["tied_embeddings"] == "kept"
        assert float((logits(load_model(merged), ids) - peft_logits(tied_base, adapter, ids)).abs().max()) < 1e-4


def test_resized_vocabulary(untied_base: Path, tied_base: Path, tmp_path: Path) -> None:
    for base, targets in ((untied_base, ["embed_tokens", "lm_head", "q_proj"]), (tied_base, ["q_proj", "v_proj"])):
        adapter = train_adapter(base, tmp_path / f"adapter_{base.name}", resize_vocab=VOCAB + 8, r=4, lora_alpha=8, target_modules=targets)
        merged = merge_one(base, adapter, tmp_path / f"merged_{base.name}")
        assert json.loads((merged / "config.json").read_text())["vocab_size"] == VOCAB + 8
        assert max_state_diff(merged, peft_merge(base, [(adapter, 1.0)], resize_vocab=VOCAB + 8)) <= TOL
        meta = json.loads((merged / METADATA_NAME).read_text())
        assert any("resized" in w for w in meta["warnings"])
        assert meta["tied_embeddings"] == (None if base == untied_base else "kept")


def test_dtype_deterministic_sharded(untied_base: Path, sentencepiece_tokenizer_dir: Path, tmp_path: Path) -> None:
    fp16_base = build_tiny_llama(tmp_path / "fp16_base", sentencepiece_tokenizer_dir, VOCAB, dtype="float16", tie_word_embeddings=False)
    adapter = train_adapter(untied_base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=ALL_LINEAR)
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        merge_adapters(fp16_base, [(adapter, 1.0)], out, progress=False, max_shard_bytes=200_000)
    files = sorted(p.name for p in a.iterdir())
    assert "model.safetensors.index.json" in files and "model-00001-of-00003.safetensors" in files
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        assert hashlib.sha256((a / name).read_bytes()).digest() == hashlib.sha256((b / name).read_bytes()).digest(), name
    state = load_model(a).state_dict()
    reference = peft_merge(fp16_base, [(adapter, 1.0)]).state_dict()
    # fp16 output: one rounding of the float32 merge
    assert max(float((state[k] - reference[k].half().float()).abs().max()) for k in reference) == 0.0
    merge_adapters(fp16_base, [(adapter, 1.0)], tmp_path / "bf16", "bfloat16", progress=False)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"


def test_metadata_and_copied_files(untied_base: Path, tmp_path: Path) -> None:
    adapter = train_adapter(untied_base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    merged = merge_one(untied_base, adapter, tmp_path / "merged")
    assert (merged / "config.json").read_bytes() == (untied_base / "config.json").read_bytes()
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        assert (merged / name).read_bytes() == (untied_base / name).read_bytes()
    meta = json.loads((merged / METADATA_NAME).read_text())
    expected = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert meta["adapters"][0]["files"]["adapter_model.safetensors"] == expected
    assert meta["adapters"][0]["lora_modules"] == 2 and meta["warnings"] == []


def test_adapter_spec_parsing(tmp_path: Path) -> None:
    assert parse_adapter_spec("some/dir") == (Path("some/dir"), 1.0)
    assert parse_adapter_spec("some/dir:0.25") == (Path("some/dir"), 0.25)
    odd = tmp_path / "a:1"
    odd.mkdir()
    assert parse_adapter_spec(str(odd)) == (odd, 1.0)
    with pytest.raises(UserInputError, match="not a number"):
        parse_adapter_spec("some/dir:heavy")


# ----------------------------------------------------------------------------- bad input
def test_adapter_for_another_base_exits_2(untied_base: Path, sentencepiece_tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = build_tiny_llama(tmp_path / "other", sentencepiece_tokenizer_dir, VOCAB, hidden_size=48, intermediate_size=96, tie_word_embeddings=False)
    adapter = train_adapter(other, tmp_path / "adapter", steps=1, r=4, lora_alpha=8, target_modules=["q_proj"])
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["merge", str(untied_base), "--adapter", str(adapter), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    print(err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "adapter_model.safetensors" in err and "model.layers.0.self_attn.q_proj" in err and "different base" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_missing_module_and_pickle_refused(untied_base: Path, sentencepiece_tokenizer_dir: Path, tmp_path: Path) -> None:
    deeper = build_tiny_llama(tmp_path / "deeper", sentencepiece_tokenizer_dir, VOCAB, num_hidden_layers=3, tie_word_embeddings=False)
    adapter = train_adapter(deeper, tmp_path / "adapter", steps=1, r=4, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(UserInputError, match=r"model\.layers\.2\.self_attn\.q_proj.*does not have"):
        merge_adapters(untied_base, [(adapter, 1.0)], tmp_path / "out", progress=False)
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    torch.save(load_file(adapter / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    with pytest.raises(InputFileError, match="--allow-pickle"):
        merge_adapters(deeper, [(pickled, 1.0)], tmp_path / "out", progress=False)
    merge_adapters(deeper, [(pickled, 1.0)], tmp_path / "out", progress=False, allow_pickle=True)
    merge_adapters(deeper, [(adapter, 1.0)], tmp_path / "out_st", progress=False)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "out_st" / "model.safetensors").read_bytes()
    assert not (tmp_path / "out" / "adapter_model.bin").exists()


def test_unsupported_variants_refused(untied_base: Path, tmp_path: Path) -> None:
    adapter = train_adapter(untied_base, tmp_path / "adapter", steps=1, r=4, lora_alpha=8, target_modules=["q_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    for field, value in (("init_lora_weights", "pissa"), ("peft_type", "ADALORA"), ("alora_invocation_tokens", [5, 6])):
        (adapter / "adapter_config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(UnsupportedError, match=field if field != "peft_type" else "ADALORA"):
            merge_adapters(untied_base, [(adapter, 1.0)], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- bitsandbytes 4-bit bases
NF4_CODE = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635, -0.18477343022823334,
    -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]


def write_bnb_checkpoint(src: Path, out: Path, weights: tuple[str, ...], blocksize: int = 64) -> dict[str, Any]:
    """Store ``weights`` of ``src`` as bitsandbytes NF4 with double quantization (the layout transformers saves)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(src / "model.safetensors")
    code = torch.tensor(NF4_CODE)
    nested_code = torch.linspace(-1, 1, 256)
    expected: dict[str, Any] = {}
    for name in weights:
        values = state.pop(name).float().reshape(-1, blocksize)
        absmax = values.abs().amax(dim=1)
        idx = (values / absmax[:, None]).unsqueeze(-1).sub(code).abs().argmin(-1).to(torch.uint8).reshape(-1)
        offset = float(absmax.mean())
        nested_absmax = (absmax - offset).abs().max().reshape(1)  # one nested block: fewer than 256 absmax values
        q_absmax = ((absmax - offset) / nested_absmax).unsqueeze(-1).sub(nested_code).abs().argmin(-1).to(torch.uint8)
        real_absmax = nested_code[q_absmax.long()] * nested_absmax + offset
        shape = list(load_file(src / "model.safetensors")[name].shape)
        expected[name] = (code[idx.long()].reshape(-1, blocksize) * real_absmax[:, None]).reshape(shape).half().float()
        state[name] = (idx[0::2] << 4 | idx[1::2]).reshape(-1, 1)
        state[f"{name}.absmax"] = q_absmax
        state[f"{name}.quant_map"] = code.clone()
        state[f"{name}.nested_absmax"] = nested_absmax
        state[f"{name}.nested_quant_map"] = nested_code.clone()
        quant = {"quant_type": "nf4", "blocksize": blocksize, "dtype": "float16", "shape": shape,
                 "nested_blocksize": 256, "nested_offset": offset, "nested_dtype": "float32"}
        state[f"{name}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(quant).encode()), dtype=torch.uint8)
    out.mkdir(parents=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    config["_name_or_path"] = "unsloth/Meta-Llama-3.1-8B-bnb-4bit"
    (out / "config.json").write_text(json.dumps(config))
    shutil.copy(src / "tokenizer.model", out / "tokenizer.model")
    return expected


def test_bnb_4bit_base_refused_naming_the_original(untied_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = train_adapter(untied_base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    quantized = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight")
    expected = write_bnb_checkpoint(untied_base, tmp_path / "bnb", quantized)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "bnb"), "--adapter", str(adapter), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    print(err)
    assert "meta-llama/Meta-Llama-3.1-8B" in err and "--dequantize-4bit-base" in err and not out.exists()

    assert main(["merge", str(tmp_path / "bnb"), "--adapter", str(adapter), "--out", str(out), "--dequantize-4bit-base", "--dtype", "float32"]) == 0
    meta = json.loads((out / METADATA_NAME).read_text())
    assert meta["dequantized_4bit_base"] and "4-bit" in meta["warnings"][0]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = load_model(out).state_dict()
    # the untouched 4-bit weight comes out as bitsandbytes' dequantization (float16 compute dtype)
    assert float((merged[quantized[1]] - expected[quantized[1]]).abs().max()) == 0.0
    # the LoRA lands on the dequantized q_proj
    reference = load_model(untied_base)
    reference.load_state_dict({**reference.state_dict(), **expected})
    reference.save_pretrained(tmp_path / "dequantized")
    assert max_state_diff(out, peft_merge(tmp_path / "dequantized", [(adapter, 1.0)])) <= TOL


@pytest.mark.parametrize(
    ("quantized", "original"),
    [
        ("unsloth/Meta-Llama-3.1-8B-bnb-4bit", "meta-llama/Meta-Llama-3.1-8B"),
        ("unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit", "meta-llama/Meta-Llama-3.1-8B-Instruct"),
        ("unsloth/llama-3-8b-bnb-4bit", "meta-llama/Meta-Llama-3-8B"),
        ("unsloth/mistral-7b-v0.3-bnb-4bit", "mistralai/Mistral-7B-v0.3"),
        ("unsloth/Qwen2.5-7B-Instruct-bnb-4bit", "Qwen/Qwen2.5-7B-Instruct"),
        ("unsloth/Llama-3.2-1B-Instruct-unsloth-bnb-4bit", "meta-llama/Llama-3.2-1B-Instruct"),
        ("someone/my-model-bnb-4bit", "someone/my-model"),
        ("meta-llama/Meta-Llama-3.1-8B", None),
    ],
)
def test_bnb_original_names(quantized: str, original: str | None) -> None:
    assert bnb.original_name(quantized) == original


# ----------------------------------------------------------------------------- the bundled SmolLM2
SMOL_CASES: dict[str, dict[str, Any]] = {
    "plain": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "rslora": {"r": 8, "lora_alpha": 16, "use_rslora": True, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "dora": {"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": ["q_proj", "v_proj", "up_proj"]},
    "embeddings_lm_head": {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "lm_head", "q_proj"]},
    "modules_to_save": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
}


@pytest.fixture(scope="module")
def smollm2_reference() -> Path:
    from quantmill.default_model import default_reference

    return default_reference()


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(SMOL_CASES))
def test_smollm2_merge_equals_peft(case: str, smollm2_reference: Path, tmp_path: Path) -> None:
    import torch

    torch.set_num_threads(2)
    ids = token_batch(49152, seed=3, batch=1, length=24)
    adapter = train_adapter(smollm2_reference, tmp_path / "adapter", steps=2, input_ids=ids, **SMOL_CASES[case])
    merged = tmp_path / "merged"
    merge_adapters(smollm2_reference, [(adapter, 1.0)], merged, "float32", progress=False)
    # SmolLM2 ties its embeddings: PEFT's reference merges into an untied copy when the adapter touches them
    untied = case in ("embeddings_lm_head",)
    diff = max_state_diff(merged, peft_merge(smollm2_reference, [(adapter, 1.0)], untied=untied))
    print(f"SmolLM2 {case}: max |quantmill - peft| = {diff:.3g}")
    assert diff <= TOL
    merged_logits = logits(load_model(merged), ids)
    assert float((merged_logits - peft_logits(smollm2_reference, adapter, ids)).abs().max()) < 1e-3


def test_refuses_to_replace_an_unrelated_directory(untied_base: Path, tmp_path: Path) -> None:
    from quantmill.errors import OutputError

    adapter = train_adapter(untied_base, tmp_path / "adapter", steps=1, r=4, lora_alpha=8, target_modules=["q_proj"])
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not an earlier merge output"):
        merge_adapters(untied_base, [(adapter, 1.0)], precious, progress=False)
    assert (precious / "notes.txt").read_text() == "keep me"
    with pytest.raises(OutputError, match="is a file"):
        merge_adapters(untied_base, [(adapter, 1.0)], precious / "notes.txt", progress=False)
    assert (precious / "notes.txt").read_text() == "keep me"
    merge_adapters(untied_base, [(adapter, 1.0)], tmp_path / "again", progress=False)
    merge_adapters(untied_base, [(adapter, 0.5)], tmp_path / "again", progress=False)  # an earlier merge output is replaced
    assert json.loads((tmp_path / "again" / METADATA_NAME).read_text())["adapters"][0]["weight"] == 0.5
