"""Tiny random replicas of every registered architecture family's shapes, built with transformers' own classes.

One row per replica; ``family`` names the architecture record (``quantmill.convert.arch``) it must
resolve to. The family × stage matrix (``tests/convert/test_families.py``) requires every registered record
to have at least one replica here, so a newly registered family gets its row (and fails until it
has a replica). Widths are multiples of 32 so that every GPTQ group size packs.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import SP_VOCAB_SIZE, TINY_DEFAULTS, build_tiny_llama

BPE_VOCAB = 49152
# LongLLaMA's Focused-Transformer fields (long_llama_3b's config.json), kept as longllama.* GGUF keys
FOT_FIELDS: dict[str, Any] = {"mem_layers": [1], "mem_dtype": "bfloat16", "mem_attention_grouping": None,
                              "last_context_length": 1024, "gradient_checkpoint_every_ith": 1,
                              "mem_positionals": True, "torch_attention": False}


def _save(model_cls: Any, config: Any, out: Path, tokenizer_dir: Path, dtype: str, seed: int) -> Path:
    import torch

    torch.manual_seed(seed)
    model_cls(config).to(getattr(torch, dtype)).eval().save_pretrained(out)
    for path in sorted(tokenizer_dir.iterdir()):
        shutil.copy(path, out / path.name)
    return out


def _edit_config(out: Path, **fields: Any) -> Path:
    config = json.loads((out / "config.json").read_text())
    config.update(fields)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out


def falcon(out: Path, tokenizer_dir: Path, dtype: str, seed: int = 0, **overrides: Any) -> Path:
    from transformers import FalconConfig, FalconForCausalLM

    settings = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "initializer_range": 0.1,
                "bos_token_id": 1, "eos_token_id": 2, "max_position_embeddings": 2048, **overrides}
    return _save(FalconForCausalLM, FalconConfig(vocab_size=BPE_VOCAB, **settings), out, tokenizer_dir, dtype, seed)


def to_refinedweb_config(out: Path) -> Path:
    """Rewrite a transformers Falcon config.json as the old RefinedWeb one (custom-code names; auto_map never run)."""
    config = json.loads((out / "config.json").read_text())
    renames = {"num_attention_heads": "n_head", "num_kv_heads": "n_head_kv", "num_hidden_layers": "n_layer"}
    dropped = ("model_type", "architectures", "new_decoder_architecture", "max_position_embeddings", "rope_parameters")
    rw = {renames.get(k, k): v for k, v in config.items() if k not in dropped}
    rw.update(model_type="RefinedWeb" if config.get("new_decoder_architecture") else "RefinedWebModel",
              architectures=["RWForCausalLM"], auto_map={"AutoModelForCausalLM": "modelling_RW.RWForCausalLM"})
    (out / "config.json").write_text(json.dumps(rw, indent=2, sort_keys=True))
    (out / "modelling_RW.py").write_text("raise SystemExit('remote code was executed')\n")
    return out


def to_pickle_upload(out: Path, shards: int) -> Path:
    """Replace model.safetensors by an old-style pickle upload: pytorch_model.bin, or N shards plus their index."""
    import torch
    from safetensors.torch import load_file

    state = load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    keys = sorted(state)
    if shards == 1:
        torch.save({k: state[k] for k in keys}, out / "pytorch_model.bin")
        return out
    weight_map = {}
    for i in range(shards):
        shard = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = keys[i::shards]
        torch.save({k: state[k] for k in part}, out / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def refinedweb(out: Path, tokenizer_dir: Path, dtype: str, seed: int = 0) -> Path:
    """A Falcon-40B-style checkpoint with the old RefinedWeb config.json."""
    falcon(out, tokenizer_dir, dtype, seed, new_decoder_architecture=True, num_kv_heads=2)
    return to_refinedweb_config(out)


def qwen(out: Path, tokenizer_dir: Path, dtype: str, seed: int = 0, version: int = 2, **overrides: Any) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config_cls, model_cls = {2: (Qwen2Config, Qwen2ForCausalLM), 3: (Qwen3Config, Qwen3ForCausalLM)}[version]
    settings = {**TINY_DEFAULTS, "head_dim": 16, "tie_word_embeddings": True, **overrides}
    return _save(model_cls, config_cls(vocab_size=BPE_VOCAB, **settings), out, tokenizer_dir, dtype, seed)


def llama(out: Path, tokenizer_dir: Path, dtype: str, seed: int = 0, **overrides: Any) -> Path:
    vocab = BPE_VOCAB if (tokenizer_dir / "tokenizer.json").is_file() else SP_VOCAB_SIZE
    return build_tiny_llama(out, tokenizer_dir, vocab, dtype=dtype, seed=seed, **overrides)


def longllama(out: Path, tokenizer_dir: Path, dtype: str, seed: int = 0) -> Path:
    llama(out, tokenizer_dir, dtype, seed, tie_word_embeddings=False)
    return _edit_config(out, model_type="longllama", architectures=["LongLlamaForCausalLM"], **FOT_FIELDS)


def lckv(out: Path, tokenizer_dir: Path, dtype: str, seed: int = 0) -> Path:
    from lckv_helpers import build_tiny_lckv

    return build_tiny_lckv(out, tokenizer_dir, dtype=dtype, seed=seed, intermediate_size=128)


@dataclass(frozen=True)
class TinyFamily:
    family: str  # the architecture record's name
    build: Callable[[Path, Path, str], Path]  # (out, tokenizer dir, dtype) -> model dir
    vocab: str = "bpe"  # "bpe": SmolLM2's vocabulary; "sp": the small SentencePiece one
    linears_per_layer: int = 7
    layers: int = 2
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


FAMILIES: dict[str, TinyFamily] = {
    "llama": TinyFamily("llama", llama),
    "tinyllama": TinyFamily("llama", lambda o, t, d: llama(o, t, d, hidden_size=256, num_attention_heads=8, num_key_value_heads=1),
                            "sp", notes="TinyLlama-style GQA (8 query heads per KV head), SentencePiece"),
    "mistral": TinyFamily("llama", lambda o, t, d: llama(o, t, d, architecture="mistral")),
    "longllama": TinyFamily("llama", longllama, "sp", notes="LongLLaMA: model_type longllama, FoT fields"),
    "lckv-w2": TinyFamily("lckv-llama", lckv, "sp", layers=6, notes="LCKV w2 layout: layers 1-4 use layer 4's KV"),
    "falcon-7b": TinyFamily("falcon", lambda o, t, d: falcon(o, t, d, multi_query=True), linears_per_layer=4),
    "falcon-40b": TinyFamily("falcon", lambda o, t, d: falcon(o, t, d, new_decoder_architecture=True, num_kv_heads=2),
                             linears_per_layer=4),
    "falcon-rw": TinyFamily("falcon", refinedweb, linears_per_layer=4, notes="RefinedWeb config.json"),
    "qwen2": TinyFamily("qwen2", lambda o, t, d: qwen(o, t, d, version=2)),
    "qwen3": TinyFamily("qwen3", lambda o, t, d: qwen(o, t, d, version=3)),
}
