"""``quantmill convert lora-to-gguf``: the GGUF LoRA applied by llama.cpp equals the merged model.

The base and the merged model are converted with quantmill's own HF -> GGUF converter (f32);
llama-cpp-python evaluates base + GGUF LoRA and the merged GGUF on the same tokens.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import build_tiny_llama
from merge_helpers import load_model, logits, train_adapter

from quantmill.cli import main
from quantmill.convert.merge.gguf_lora import export_lora_gguf
from quantmill.convert.merge.merge import merge_adapters
from quantmill.errors import UnsupportedError

VOCAB = 1000
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = [1, 17, 250, 33, 999, 4, 512, 87, 6, 140, 77, 300]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, sentencepiece_tokenizer_dir: Path) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("lora_gguf_base"), sentencepiece_tokenizer_dir, VOCAB, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def base_gguf(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from quantmill.convert.hf_to_gguf import convert_hf_to_gguf

    return convert_hf_to_gguf(base, "f32", tmp_path_factory.mktemp("lora_gguf_base_f32") / "base.gguf", progress=False)[0]


def llama_logits(model: Path, lora: Path | None = None) -> np.ndarray:
    from llama_cpp import Llama

    kwargs: dict[str, Any] = {"lora_path": str(lora)} if lora is not None else {}
    # float32 KV cache: the default f16 cache rounds K/V, which turns 1e-7 differences into 1e-4 ones
    llm = Llama(model_path=str(model), n_ctx=64, n_batch=64, logits_all=True, n_threads=2, verbose=False, type_k=0, type_v=0, **kwargs)
    llm.eval(TOKENS)
    scores = np.array(llm.scores[: len(TOKENS)], dtype=np.float64)
    llm.close()
    return scores


CASES: dict[str, dict[str, Any]] = {
    "plain_with_embeddings": {"r": 4, "lora_alpha": 8, "target_modules": ALL_LINEAR + ["embed_tokens", "lm_head"]},
    "rslora": {"r": 8, "lora_alpha": 4, "use_rslora": True, "target_modules": ALL_LINEAR},
    "rank_alpha_pattern": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ALL_LINEAR,
        "rank_pattern": {"k_proj": 2, "layers.1.self_attn.q_proj": 6},
        "alpha_pattern": {"q_proj": 3, "down_proj": 24},
    },
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gguf_lora_matches_merged_model(case: str, base: Path, base_gguf: Path, tmp_path: Path) -> None:
    import torch

    from quantmill.convert.hf_to_gguf import convert_hf_to_gguf

    adapter = train_adapter(base, tmp_path / "adapter", **CASES[case])
    lora = export_lora_gguf(adapter, base, tmp_path / "lora.gguf")
    merged = tmp_path / "merged"
    merge_adapters(base, [(adapter, 1.0)], merged, "float32", progress=False)
    merged_gguf = convert_hf_to_gguf(merged, "f32", tmp_path / "merged.gguf", progress=False)[0]

    with_lora = llama_logits(base_gguf, lora)
    from_merged = llama_logits(merged_gguf)
    plain = llama_logits(base_gguf)
    torch_merged = logits(load_model(merged), torch.tensor([TOKENS]))[0].double().numpy()
    diff = float(np.abs(with_lora - from_merged).max())
    effect = float(np.abs(from_merged - plain).max())
    print(f"{case}: llama.cpp base+GGUF LoRA vs merged GGUF max |dlogit| = {diff:.3g} (LoRA effect {effect:.3g},"
          f" merged GGUF vs transformers {float(np.abs(from_merged - torch_merged).max()):.3g})")
    assert effect > 0.05
    assert diff < 1e-5
    assert float(np.abs(with_lora - torch_merged).max()) < 1e-4


def test_gguf_lora_layout(base: Path, tmp_path: Path) -> None:
    from gguf import GGUFReader

    adapter = train_adapter(base, tmp_path / "adapter", steps=1, r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "embed_tokens"])
    path = export_lora_gguf(adapter, base, tmp_path / "lora.gguf", "f16")
    reader = GGUFReader(path)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(8.0)
    shapes = {t.name: (t.tensor_type.name, [int(d) for d in t.shape]) for t in reader.tensors}
    assert shapes["blk.0.attn_q.weight.lora_a"] == ("F16", [64, 4])  # GGUF dims: [in, r]
    assert shapes["blk.0.attn_q.weight.lora_b"] == ("F16", [4, 64])  # [r, out]
    assert shapes["token_embd.weight.lora_a"] == ("F16", [4, VOCAB])  # A transposed: [r, vocab]
    assert shapes["token_embd.weight.lora_b"] == ("F16", [4, 64])
    # rsLoRA (alpha/sqrt(r)) folded into B: llama.cpp applies alpha/r
    from safetensors.torch import load_file

    raw = load_file(adapter / "adapter_model.safetensors")["base_model.model.model.embed_tokens.lora_embedding_B"].numpy()
    stored = next(t for t in reader.tensors if t.name == "token_embd.weight.lora_b").data.astype(np.float32)
    assert np.allclose(stored, (raw * 2.0).astype(np.float16), atol=0)  # sqrt(4) = 2, no Q/K permutation on embeddings


def test_gguf_lora_is_deterministic(base: Path, tmp_path: Path) -> None:
    adapter = train_adapter(base, tmp_path / "adapter", steps=1, r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"])
    first = export_lora_gguf(adapter, base, tmp_path / "a.gguf").read_bytes()
    assert first == export_lora_gguf(adapter, base, tmp_path / "b.gguf").read_bytes()


def test_refused_exports(base: Path, sentencepiece_tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dora = train_adapter(base, tmp_path / "dora", steps=1, r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"])
    capsys.readouterr()
    out = tmp_path / "dora.gguf"
    assert main(["convert", "lora-to-gguf", str(dora), "--base", str(base), "--outfile", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "DoRA" in err and "quantmill merge" in err and not out.exists()

    saved = train_adapter(base, tmp_path / "saved", steps=1, r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(UnsupportedError, match="lm_head.weight.*trained full tensor"):
        export_lora_gguf(saved, base, tmp_path / "saved.gguf")

    tied = build_tiny_llama(tmp_path / "tied", sentencepiece_tokenizer_dir, VOCAB, tie_word_embeddings=True)
    emb = train_adapter(tied, tmp_path / "emb", steps=1, r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(UnsupportedError, match="tied"):
        export_lora_gguf(emb, tied, tmp_path / "emb.gguf")

    other = build_tiny_llama(tmp_path / "other", sentencepiece_tokenizer_dir, VOCAB, hidden_size=48, intermediate_size=96, tie_word_embeddings=False)
    mismatched = train_adapter(other, tmp_path / "mismatched", steps=1, r=4, lora_alpha=8, target_modules=["q_proj"])
    capsys.readouterr()
    assert main(["convert", "lora-to-gguf", str(mismatched), "--base", str(base), "--outfile", str(tmp_path / "m.gguf")]) == 2
    assert "different base" in capsys.readouterr().err and not (tmp_path / "m.gguf").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


@pytest.mark.slow
def test_smollm2_gguf_lora_matches_merged_model(tmp_path: Path) -> None:
    import torch
    from merge_helpers import token_batch

    from quantmill.convert.hf_to_gguf import convert_hf_to_gguf
    from quantmill.default_model import default_reference

    torch.set_num_threads(2)
    reference = default_reference()
    ids = token_batch(49152, seed=3, batch=1, length=24)
    adapter = train_adapter(
        reference, tmp_path / "adapter", steps=2, input_ids=ids, r=8, lora_alpha=16, use_rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
    )
    lora = export_lora_gguf(adapter, reference, tmp_path / "lora.gguf")
    merge_adapters(reference, [(adapter, 1.0)], tmp_path / "merged", "float32", progress=False)
    base_gguf = convert_hf_to_gguf(reference, "f32", tmp_path / "base.gguf", progress=False)[0]
    merged_gguf = convert_hf_to_gguf(tmp_path / "merged", "f32", tmp_path / "merged.gguf", progress=False)[0]
    with_lora, from_merged, plain = llama_logits(base_gguf, lora), llama_logits(merged_gguf), llama_logits(base_gguf)
    diff, effect = float(np.abs(with_lora - from_merged).max()), float(np.abs(from_merged - plain).max())
    print(f"SmolLM2 rsLoRA: llama.cpp base+GGUF LoRA vs merged GGUF max |dlogit| = {diff:.3g} (LoRA effect {effect:.3g})")
    assert effect > 0.05
    assert diff < 1e-3
