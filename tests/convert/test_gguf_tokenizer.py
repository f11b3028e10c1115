"""The tokenizer built from a GGUF vocabulary gives llama.cpp's token ids.

Fast tests: tiny BPE (several llama.cpp pre-tokenizers) and SentencePiece vocabularies
written into tiny GGUFs, tokenized by llama-cpp-python and by our tokenizer.json.
Slow tests: the bundled SmolLM2 GGUF on whole real texts.
"""
from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

import pytest
from tiny_gguf import bpe_vocab, spm_vocab, training_text, write_tiny_gguf

from quantmill.convert.gguf_to_hf import gguf_to_hf
from quantmill.convert.gguf_tokenizer import BPE_PRE_TOKENIZERS, GGUFVocab, build_tokenizer
from quantmill.errors import UnsupportedError

LICENSES = Path("/usr/share/common-licenses")

STRESS = (
    "Hello  world\n\n  0. 12345 3.14\t\t x\r\n\r\n  \n   y  \u00a0 z \u3000 caf\u00e9 na\u00efve \U0001F680\U0001F680 "
    "I've 'S 'RE we'Ve \u6211\u60f3\u5728apple\u5de5\u4f5c 1314151\u5929\uff5e ------=======  "
    "\u043d\u0435\u0449\u043e  "
    "<|im_start|>user\n  hi <|im_end|> <s>x</s>   "
)


def _texts() -> dict[str, str]:
    return {
        "argparse.py": inspect.getsource(argparse)[:30000],
        "training": training_text()[:6000],
        "stress": STRESS,
        "leading spaces": "   three leading spaces",
        "empty": "",
    }


def _llama_ids(gguf_path: Path, text: str, special: bool, add_bos: bool) -> list[int]:
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=add_bos, special=special)
    finally:
        llm.close()


def _ours(tokenizer_json: Path, text: str, special: bool) -> list[int]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    tokenizer.encode_special_tokens = not special  # llama.cpp's special=False: control tokens are plain text
    return tokenizer.encode(text).ids


VOCABS = [("gpt2", pre) for pre in ("smollm", "gpt-2", "llama-bpe", "qwen2", "default")] + [("llama", None)]


@pytest.fixture(scope="module", params=VOCABS, ids=lambda p: p[1] or "spm")
def tiny_checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    model, pre = request.param
    vocab = bpe_vocab(pre=pre) if model == "gpt2" else spm_vocab()
    root = tmp_path_factory.mktemp(f"tok-{pre or 'spm'}")
    gguf_path = root / "tiny.gguf"
    write_tiny_gguf(gguf_path, vocab)
    return gguf_path, gguf_to_hf(gguf_path, root / "hf", progress=False)


@pytest.mark.parametrize("special", [True, False])
def test_tiny_vocab_ids_equal_llama_cpp(tiny_checkpoint: tuple[Path, Path], special: bool) -> None:
    gguf_path, hf_dir = tiny_checkpoint
    for name, text in _texts().items():
        expected = _llama_ids(gguf_path, text, special=special, add_bos=True)
        assert _ours(hf_dir / "tokenizer.json", text, special) == expected, name


def test_tiny_vocab_transformers_equals_llama_cpp(tiny_checkpoint: tuple[Path, Path]) -> None:
    from transformers import AutoTokenizer

    gguf_path, hf_dir = tiny_checkpoint
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    for name, text in _texts().items():
        expected = _llama_ids(gguf_path, text, special=True, add_bos=True)
        assert tokenizer(text)["input_ids"] == expected, name
        if name != "stress":  # SentencePiece adds a space after each special token, so stress is not lossless
            body = expected[1:] if expected[:1] == [tokenizer.bos_token_id] else expected
            assert tokenizer.decode(body, skip_special_tokens=False) == text, name


def test_tokenizer_config_follows_gguf(tiny_checkpoint: tuple[Path, Path]) -> None:
    from quantmill.convert.gguf_reader import GGUFFile

    gguf_path, hf_dir = tiny_checkpoint
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    is_spm = GGUFFile.open(gguf_path).require_str("tokenizer.ggml.model") == "llama"
    # SentencePiece GGUFs without add_bos_token get BOS (llama.cpp's default); the tiny BPE ones say False
    assert config["add_bos_token"] is is_spm
    assert config["add_prefix_space"] is is_spm
    assert config["chat_template"].startswith("{% for m in messages %}")
    assert (_llama_ids(gguf_path, "x", special=True, add_bos=True)[0] == 1) is is_spm


def test_every_registered_pre_tokenizer_compiles() -> None:
    from tokenizers import Regex

    for name, spec in BPE_PRE_TOKENIZERS.items():
        assert spec.regexes, name
        for regex in spec.regexes:
            Regex(regex)


def test_unknown_pre_tokenizer_is_a_clear_error() -> None:
    vocab = bpe_vocab(pre="no-such-pre")
    with pytest.raises(UnsupportedError, match="no-such-pre.*BPE_PRE_TOKENIZERS"):
        build_tokenizer(GGUFVocab("gpt2", vocab.tokens, vocab.token_types, pre=vocab.pre, merges=vocab.merges))


def test_unknown_tokenizer_model_is_a_clear_error() -> None:
    with pytest.raises(UnsupportedError, match="'bert' is not supported"):
        build_tokenizer(GGUFVocab(model="bert", tokens=["a"], token_types=[1]))


def test_duplicate_tokens_are_rejected() -> None:
    with pytest.raises(UnsupportedError, match="twice"):
        build_tokenizer(GGUFVocab(model="gpt2", tokens=["a", "b", "a"], token_types=[1, 1, 1], pre="gpt-2"))


# ------------------------------------------------------------------------- bundled SmolLM2
@pytest.fixture(scope="module")
def smollm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from quantmill.default_model import bundled_gguf_path

    gguf_path = bundled_gguf_path()
    return gguf_path, gguf_to_hf(gguf_path, tmp_path_factory.mktemp("smollm") / "hf", progress=False)


def _real_texts() -> dict[str, str]:
    names = [name for name in ("GPL-3", "Apache-2.0") if (LICENSES / name).is_file()]
    texts = {name: (LICENSES / name).read_text(encoding="utf-8") for name in names}
    texts["argparse.py"] = inspect.getsource(argparse)
    texts["stress"] = STRESS
    return texts


@pytest.mark.slow
def test_smollm_ids_equal_llama_cpp_on_real_text(smollm: tuple[Path, Path]) -> None:
    from transformers import AutoTokenizer

    gguf_path, hf_dir = smollm
    if not (LICENSES / "GPL-3").is_file():
        pytest.skip(f"{LICENSES / 'GPL-3'} not present (Debian's base-files ships it)")
    auto = AutoTokenizer.from_pretrained(hf_dir)
    counts = {}
    for name, text in _real_texts().items():
        for special in (False, True):
            expected = _llama_ids(gguf_path, text, special=special, add_bos=False)
            assert _ours(hf_dir / "tokenizer.json", text, special) == expected, (name, special)
        assert auto(text, add_special_tokens=False)["input_ids"] == expected, name
        counts[name] = len(expected)
    print("token counts (llama.cpp == ours):", counts)
    assert counts["GPL-3"] == 7639  # the figure DESIGN.md records for llama.cpp's smollm pre-tokenizer


@pytest.mark.slow
def test_smollm_chat_template_tokens(smollm: tuple[Path, Path]) -> None:
    from transformers import AutoTokenizer

    gguf_path, hf_dir = smollm
    auto = AutoTokenizer.from_pretrained(hf_dir)
    messages = [{"role": "user", "content": "  Hi\n\nthere 42"}]
    chat = auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>assistant\n")
    expected = _llama_ids(gguf_path, chat, special=True, add_bos=False)
    assert auto(chat, add_special_tokens=False)["input_ids"] == expected
    assert expected[0] == auto.convert_tokens_to_ids("<|im_start|>") == 1


@pytest.mark.slow
def test_smollm_probe_hash_is_smollm(smollm: tuple[Path, Path]) -> None:
    """llama.cpp's converter (and ours) must recognise the reference tokenizer as 'smollm'."""
    from transformers import AutoTokenizer

    from quantmill.convert.vocab_pre import PRE_BY_HASH, PROBE_TEXT, probe_hash

    _, hf_dir = smollm
    digest = probe_hash(AutoTokenizer.from_pretrained(hf_dir).encode(PROBE_TEXT))
    assert digest == "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"
    assert PRE_BY_HASH[digest][0] == "smollm"
