"""Build a Hugging Face ``tokenizers`` tokenizer from a GGUF vocabulary.

The goal is the same token ids as llama.cpp gives for the same GGUF, so that a checkpoint
converted from a GGUF is scored on exactly the tokens llama.cpp would feed it:

* ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE): the text is split by the regex list
  llama.cpp uses for the file's ``tokenizer.ggml.pre`` (each regex splits every piece the
  previous one left, matches and gaps both kept), then byte-level mapped and BPE-merged in
  the order of ``tokenizer.ggml.merges``.
* ``tokenizer.ggml.model == "llama"`` (SentencePiece): whitespace escaped to U+2581 with a
  leading one, BPE merges ranked by the score of the merged piece, byte fallback.

Control, unknown and user-defined tokens are added tokens matched in the raw text before
anything else, as llama.cpp does when it parses special tokens.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from quantmill.convert.gguf_reader import GGUFFile
from quantmill.errors import InputFileError, UnsupportedError

# gguf.TokenType values (facts of the format)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

SPM_SPACE = "\u2581"

# Regexes llama.cpp applies per pre-tokenizer type (src/llama-vocab.cpp).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizerSpec:
    """How llama.cpp pre-tokenizes one family of BPE vocabularies."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a word that is itself a token is not merged piecewise
    clean_spaces: bool = True  # llama.cpp's detokenizer clean-up ("a ." -> "a.")
    add_bos: bool = False  # what llama.cpp assumes when the GGUF has no add_bos_token key


_DEFAULT_SPEC = PreTokenizerSpec((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))
_GPT2_SPEC = PreTokenizerSpec((_GPT2,))
_DIGITS_GPT2_SPEC = PreTokenizerSpec((r"\p{N}", _GPT2))
_LLAMA3_SPEC = PreTokenizerSpec((_LLAMA3,), ignore_merges=True, add_bos=True)
_QWEN2_SPEC = PreTokenizerSpec((_QWEN2,), clean_spaces=False)


def _family(spec: PreTokenizerSpec, *names: str, **changes: Any) -> dict[str, PreTokenizerSpec]:
    final = dataclasses.replace(spec, **changes)
    return {name: final for name in names}


# tokenizer.ggml.pre -> how to pre-tokenize. Names as llama.cpp spells them.
BPE_PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    **_family(_DEFAULT_SPEC, "default"),
    **_family(_GPT2_SPEC, "gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "gigachat", "mellum"),
    **_family(_DIGITS_GPT2_SPEC, "starcoder", "refact", "codeshell", "exaone", "minerva-7b", "mellum2"),
    **_family(_DIGITS_GPT2_SPEC, "smollm", "command-r", clean_spaces=False),
    **_family(_LLAMA3_SPEC, "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "lfm2"),
    **_family(_LLAMA3_SPEC, "dbrx", "smaug-bpe", ignore_merges=False, add_bos=False),
    **_family(_QWEN2_SPEC, "qwen2", "deepseek-r1-qwen", "megrez"),
    **_family(_QWEN2_SPEC, "stablelm2", clean_spaces=True),
}


@dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer part of a GGUF's metadata, as plain data."""

    model: str
    tokens: list[str]
    token_types: list[int]
    pre: str | None = None
    merges: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    eot_id: int | None = None
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    def token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokens[token_id]

    @property
    def is_spm(self) -> bool:
        return self.model == "llama"

    @property
    def adds_bos(self) -> bool:
        """Whether llama.cpp prepends BOS: the GGUF key, else its default for this vocabulary."""
        if self.add_bos is not None:
            return self.add_bos
        return True if self.is_spm else bpe_pre_tokenizer_spec(self.pre).add_bos

    @property
    def adds_space_prefix(self) -> bool:
        if self.add_space_prefix is not None:
            return self.add_space_prefix
        return self.is_spm


def vocab_from_gguf(gguf_file: GGUFFile) -> GGUFVocab:
    """Read the ``tokenizer.ggml.*`` keys (and the chat template) of an open GGUF."""
    key = "tokenizer.ggml."
    tokens = [str(t) for t in gguf_file.require_array(key + "tokens")]
    n_tokens = len(tokens)
    types = [int(t) for t in gguf_file.get_array(key + "token_type", [TOKEN_NORMAL] * n_tokens)]
    ids = {name: gguf_file.get_int(f"{key}{name}_token_id") for name in ("bos", "eos", "unknown", "padding", "eot")}
    for name, token_id in ids.items():
        if token_id is not None and not 0 <= token_id < n_tokens:
            raise InputFileError(
                gguf_file.path, f"{key}{name}_token_id = {token_id} is outside the vocabulary of {n_tokens}",
                "re-create the GGUF",
            )
    return GGUFVocab(
        model=gguf_file.require_str(key + "model"),
        tokens=tokens,
        token_types=types,
        pre=gguf_file.get_str(key + "pre"),
        merges=[str(m) for m in gguf_file.get_array(key + "merges", [])],
        scores=[float(s) for s in gguf_file.get_array(key + "scores", [])],
        bos_id=ids["bos"],
        eos_id=ids["eos"],
        unk_id=ids["unknown"],
        pad_id=ids["padding"],
        eot_id=ids["eot"],
        add_bos=gguf_file.get_bool(key + "add_bos_token"),
        add_eos=gguf_file.get_bool(key + "add_eos_token"),
        add_space_prefix=gguf_file.get_bool(key + "add_space_prefix"),
        chat_template=gguf_file.get_str("tokenizer.chat_template"),
    )


# ---------------------------------------------------------------------------- BPE (gpt2)
def bpe_pre_tokenizer_spec(pre: str | None) -> PreTokenizerSpec:
    name = pre or "default"  # llama.cpp also falls back to "default" when the key is absent
    spec = BPE_PRE_TOKENIZERS.get(name)
    if spec is None:
        known = ", ".join(sorted(BPE_PRE_TOKENIZERS))
        raise UnsupportedError(
            f"tokenizer.ggml.pre = {name!r} is not a pre-tokenizer quantmill knows ({known}); "
            "convert a GGUF with one of these, or add its regexes to BPE_PRE_TOKENIZERS"
        )
    return spec


def _build_bpe(vocab: GGUFVocab) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    spec = bpe_pre_tokenizer_spec(vocab.pre)
    merges = [_split_merge(m) for m in vocab.merges]
    model = models.BPE(
        vocab=_vocab_dict(vocab), merges=merges, ignore_merges=spec.ignore_merges, fuse_unk=False, byte_fallback=False
    )
    tokenizer = Tokenizer(model)
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in spec.regexes]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)  # type: ignore[call-arg]
    tokenizer.post_processor = _template(vocab) or processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _split_merge(merge: str) -> tuple[str, str]:
    left, sep, right = merge.partition(" ")
    if not sep or not left or not right:
        raise UnsupportedError(
            f"tokenizer.ggml.merges entry {merge!r} is not 'LEFT RIGHT'; the GGUF vocabulary is damaged, re-create it"
        )
    return left, right


# ---------------------------------------------------------------------- SentencePiece (llama)
def _spm_merges(vocab: GGUFVocab) -> list[tuple[str, str]]:
    """Merges ranked by the score of the merged piece (highest first), as llama.cpp merges."""
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    scores = vocab.scores or [0.0] * len(vocab.tokens)
    order = sorted(
        (i for i, kind in enumerate(vocab.token_types) if kind == TOKEN_NORMAL), key=lambda i: (-scores[i], i)
    )
    merges: list[tuple[str, str]] = []
    for i in order:
        piece = vocab.tokens[i]
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                merges.append((left, right))
    return merges


def _build_spm(vocab: GGUFVocab) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers

    unk = vocab.token(vocab.unk_id)
    model = models.BPE(
        vocab=_vocab_dict(vocab), merges=_spm_merges(vocab), unk_token=unk, fuse_unk=True, byte_fallback=True
    )
    tokenizer = Tokenizer(model)
    add_prefix = vocab.adds_space_prefix
    steps = [normalizers.Prepend(SPM_SPACE)] if add_prefix else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPM_SPACE)])
    strip = [decoders.Strip(" ", 1, 0)] if add_prefix else []
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    template = _template(vocab)
    if template is not None:
        tokenizer.post_processor = template
    return tokenizer


# ---------------------------------------------------------------------------- shared parts
def _vocab_dict(vocab: GGUFVocab) -> dict[str, int]:
    table: dict[str, int] = {}
    for i, token in enumerate(vocab.tokens):
        if token in table:
            raise UnsupportedError(
                f"tokenizer.ggml.tokens lists {token!r} twice (ids {table[token]} and {i}); "
                "llama.cpp rejects such a vocabulary too, re-create the GGUF"
            )
        table[token] = i
    return table


def _template(vocab: GGUFVocab) -> Any:
    """A post-processor adding BOS/EOS when llama.cpp would add them, else None."""
    from tokenizers import processors

    bos = vocab.token(vocab.bos_id) if vocab.adds_bos else None
    eos = vocab.token(vocab.eos_id) if vocab.add_eos else None
    if bos is None and eos is None:
        return None
    pre = [bos] if bos else []
    post = [eos] if eos else []
    single = [*pre, "$A", *post]
    pair = [*single, *pre, "$B:1", *post]
    special = [(t, vocab.tokens.index(t)) for t in dict.fromkeys([*pre, *post])]
    return processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair), special_tokens=special)


def _added_tokens(vocab: GGUFVocab) -> list[Any]:
    from tokenizers import AddedToken

    special_by_kind = {TOKEN_CONTROL: True, TOKEN_UNKNOWN: True, TOKEN_USER_DEFINED: False}
    return [
        AddedToken(token, special=special_by_kind[kind], normalized=False, lstrip=False, rstrip=False)
        for token, kind in zip(vocab.tokens, vocab.token_types, strict=True)
        if kind in special_by_kind
    ]


_BUILDERS: dict[str, Callable[[GGUFVocab], Any]] = {"gpt2": _build_bpe, "llama": _build_spm}


def build_tokenizer(vocab: GGUFVocab) -> Any:
    """A ``tokenizers.Tokenizer`` that tokenizes as llama.cpp does for this vocabulary."""
    if len(vocab.tokens) != len(vocab.token_types):
        raise UnsupportedError(
            f"tokenizer.ggml.token_type has {len(vocab.token_types)} entries for {len(vocab.tokens)} tokens; "
            "re-create the GGUF"
        )
    builder = _BUILDERS.get(vocab.model)
    if builder is None:
        raise UnsupportedError(
            f"tokenizer.ggml.model = {vocab.model!r} is not supported (supported: {', '.join(sorted(_BUILDERS))}); "
            "convert a model with a BPE or SentencePiece vocabulary"
        )
    tokenizer = builder(vocab)
    tokenizer.add_tokens(_added_tokens(vocab))
    return tokenizer


def _special_names(vocab: GGUFVocab) -> dict[str, str]:
    names = {"bos_token": vocab.bos_id, "eos_token": vocab.eos_id, "unk_token": vocab.unk_id, "pad_token": vocab.pad_id}
    return {key: vocab.tokens[i] for key, i in names.items() if i is not None}


def tokenizer_files(vocab: GGUFVocab, model_max_length: int) -> dict[str, str]:
    """File name -> text of tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
    tokenizer = build_tokenizer(vocab)
    named = _special_names(vocab)
    extra = [
        t
        for t, kind in zip(vocab.tokens, vocab.token_types, strict=True)
        if kind == TOKEN_CONTROL and t not in named.values()
    ]
    clean = False if vocab.is_spm else bpe_pre_tokenizer_spec(vocab.pre).clean_spaces
    config: dict[str, Any] = {
        "add_bos_token": vocab.adds_bos and vocab.bos_id is not None,
        "add_eos_token": bool(vocab.add_eos) and vocab.eos_id is not None,
        "add_prefix_space": vocab.adds_space_prefix,
        "clean_up_tokenization_spaces": clean,
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
    }
    if vocab.chat_template:
        config["chat_template"] = vocab.chat_template
    special_map: dict[str, Any] = dict(named)
    if extra:
        special_map["additional_special_tokens"] = extra
    return {
        "tokenizer.json": _pretty_json(json.loads(tokenizer.to_str())),
        "tokenizer_config.json": _pretty_json(config),
        "special_tokens_map.json": _pretty_json(special_map),
    }


def _pretty_json(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n"
