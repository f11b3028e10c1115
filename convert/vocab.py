"""Tokenizer → GGUF vocabulary: byte-level BPE (tokenizer.json) and SentencePiece (tokenizer.model).

The result is what llama.cpp's converter writes for the same files: the token list,
token types (and scores for SentencePiece), the BPE merges, ``tokenizer.ggml.pre``
chosen by the probe-text hash (an unknown hash is an error unless the caller names the
pre-tokenizer), special token ids, add-BOS/EOS flags and the chat template. The
vocabulary is checked against the embedding rows, so a tokenizer saved without its
vocabulary cannot turn silently into a tiny one.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf.constants import Keys

from quantmill.convert.special_tokens import ADD_KEYS, ID_KEYS, SpecialTokens, read_special_tokens, read_tokenizer_json
from quantmill.convert.vocab_pre import KNOWN_PRE_NAMES, PRE_BY_HASH, PROBE_TEXT, probe_hash
from quantmill.errors import InputFileError, UnsupportedError, UserInputError

# gguf.TokenType values.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPIECE_SPACE = "\u2581"
# A tokenizer may define fewer tokens than the embedding has rows (rows are often padded
# to a multiple of 64 or 128); more missing rows than this means a broken tokenizer.
MAX_PADDING_ROWS = 1024
MAX_PADDING_FRACTION = 0.10
VOCAB_KINDS: tuple[str, ...] = ("sentencepiece", "bpe")


@dataclass
class Vocab:
    """Everything the GGUF tokenizer keys need, in llama.cpp's order."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str
    tokens: list[str] | list[bytes]
    token_types: list[int]
    source: Path
    n_defined: int  # token ids the tokenizer itself defines (padding excluded)
    scores: list[float] | None = None
    special: SpecialTokens = field(default_factory=SpecialTokens)
    add_space_prefix: bool | None = None


def looks_special(token: str) -> bool:
    """Added tokens that some models forget to mark special (same rule as llama.cpp)."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _named_specials(config: dict[str, Any]) -> set[str]:
    """Special tokens tokenizer_config.json names; transformers registers them as added tokens."""
    names: set[str] = set()
    for key in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            names.add(value)
    for key in ("additional_special_tokens", "extra_special_tokens"):
        extra = config.get(key)
        values = extra.values() if isinstance(extra, dict) else extra if isinstance(extra, list) else []
        names.update(v if isinstance(v, str) else v.get("content", "") for v in values if isinstance(v, (str, dict)))
    return names


def _resolve_pre(tokenizer: Any, source: Path, override: str | None) -> str:
    if override is not None:
        if override not in KNOWN_PRE_NAMES:
            raise UserInputError(
                f"--vocab-pre {override!r} is not a llama.cpp pre-tokenizer; use one of: {', '.join(sorted(KNOWN_PRE_NAMES))}"
            )
        return override
    digest = probe_hash(tokenizer.encode(PROBE_TEXT).ids)
    if digest not in PRE_BY_HASH:
        raise UnsupportedError(
            f"{source}: BPE pre-tokenizer not recognised (probe hash {digest[:16]}…); pass --vocab-pre NAME with the"
            " llama.cpp pre-tokenizer that matches this tokenizer's pre_tokenizer (e.g. gpt-2, llama-bpe, smollm)"
        )
    return PRE_BY_HASH[digest][0]


def load_bpe(model_dir: Path, vocab_size: int, embedding_rows: int, pre_override: str | None = None) -> Vocab:
    """A GPT-2 style byte-level BPE vocabulary from tokenizer.json (through the tokenizers library)."""
    from tokenizers import Tokenizer

    source = model_dir / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(source))
    except Exception as exc:  # the tokenizers library raises a bare Exception on malformed files
        raise InputFileError(source, f"cannot be loaded by the tokenizers library ({exc})", "re-save the tokenizer") from exc
    cfg_path = model_dir / "tokenizer_config.json"
    config = read_tokenizer_json(cfg_path) if cfg_path.is_file() else {}
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    check_vocab_size(source, len(vocab), embedding_rows)
    added = dict(tokenizer.get_added_tokens_decoder())
    added_content = {tok.content for tok in added.values()}
    promoted = {name for name in _named_specials(config) if name in vocab and name not in added_content}
    if vocab and max(vocab.values()) >= vocab_size:
        raise InputFileError(
            source, f"has token id {max(vocab.values())} but the model's vocab_size is {vocab_size}", "use the tokenizer saved with this model"
        )
    by_id = {tid: tok for tok, tid in vocab.items()}
    tokens: list[str] = []
    types: list[int] = []
    for tid in range(vocab_size):
        token = by_id.get(tid)
        if token is None:
            tokens.append(f"[PAD{tid}]")
            types.append(UNUSED)
            continue
        entry = added.get(tid)
        if entry is not None or token in added_content or token in promoted:
            special = token in promoted or (entry is not None and entry.special)
            if entry is not None and not entry.normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False).ids, skip_special_tokens=False)
            if special or looks_special(token):
                types.append(CONTROL)
            else:
                token = token.replace(SPIECE_SPACE, " ")
                types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(token)
    pre = _resolve_pre(tokenizer, source, pre_override)
    special_tokens = read_special_tokens(model_dir, load_merges=True)
    return Vocab("gpt2", pre, tokens, types, source, len(vocab), special=special_tokens, add_space_prefix=_space_prefix(config))


def load_sentencepiece(model_dir: Path, vocab_size: int, embedding_rows: int) -> Vocab:
    """A SentencePiece vocabulary from tokenizer.model, with added tokens from the HF files."""
    from sentencepiece import SentencePieceProcessor

    source = model_dir / "tokenizer.model"
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(source))
    except (OSError, RuntimeError) as exc:
        raise InputFileError(source, f"is not a SentencePiece model ({exc})", "use the tokenizer.model saved with this model") from exc
    n_sp = sp.vocab_size()
    if n_sp > vocab_size:
        raise InputFileError(source, f"defines {n_sp} tokens but the model's vocab_size is {vocab_size}", "use the tokenizer saved with this model")
    tokens: list[bytes] = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [UNUSED] * vocab_size
    type_tests: tuple[tuple[Callable[[int], bool], int], ...] = (
        (sp.IsUnknown, UNKNOWN), (sp.IsControl, CONTROL), (sp.IsUnused, UNUSED), (sp.IsByte, BYTE),
    )
    for tid in range(n_sp):
        tokens[tid] = sp.IdToPiece(tid).encode("utf-8")
        scores[tid] = sp.GetScore(tid)
        types[tid] = next((kind for test, kind in type_tests if test(tid)), NORMAL)
    n_defined = n_sp
    added_path = model_dir / "added_tokens.json"
    if added_path.is_file():
        for text, tid in read_tokenizer_json(added_path).items():
            if isinstance(tid, int) and 0 <= tid < vocab_size:
                tokens[tid], scores[tid], types[tid] = text.encode("utf-8"), -1000.0, USER_DEFINED
                n_defined = max(n_defined, tid + 1)
    cfg_path = model_dir / "tokenizer_config.json"
    config = read_tokenizer_json(cfg_path) if cfg_path.is_file() else {}
    for key, data in (config.get("added_tokens_decoder") or {}).items():
        tid, text = int(key), data["content"]
        if tid >= vocab_size:
            continue
        if data.get("special") or looks_special(text):
            types[tid] = CONTROL
        else:
            text = text.replace(SPIECE_SPACE, " ")
            types[tid] = USER_DEFINED
        scores[tid], tokens[tid] = -1000.0, text.encode("utf-8")
        n_defined = max(n_defined, tid + 1)
    check_vocab_size(source, n_defined, embedding_rows)
    special = read_special_tokens(model_dir, n_vocab=len(tokens))
    return Vocab("llama", "default", tokens, types, source, n_defined, scores, special, _space_prefix(config))


def _space_prefix(config: dict[str, Any]) -> bool | None:
    value = config.get("add_prefix_space")
    return value if isinstance(value, bool) else None


def _is_sentencepiece_style_json(path: Path) -> bool:
    """A tokenizer.json that is a converted SentencePiece model (byte-fallback BPE), not GPT-2 style."""
    data = read_tokenizer_json(path)
    model = data.get("model", {})
    if not isinstance(model, dict):
        raise InputFileError(path, "has no tokenizer model object (field 'model')", "re-save the tokenizer with transformers")
    decoder = data.get("decoder") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and isinstance(decoder, dict) and decoder.get("type") == "Sequence"


def load_vocab(
    model_dir: Path, vocab_size: int, embedding_rows: int, pre_override: str | None = None, kinds: tuple[str, ...] = VOCAB_KINDS
) -> Vocab:
    """The vocabulary of ``model_dir``: tokenizer.model if present, else a byte-level BPE tokenizer.json.

    ``embedding_rows`` is the token embedding's row count; a tokenizer that covers far
    fewer (or more) ids is refused. ``kinds`` are the tokenizer kinds the architecture accepts.
    """
    kind = "sentencepiece" if (model_dir / "tokenizer.model").is_file() else "bpe"
    if kind not in kinds:
        raise UnsupportedError(f"{model_dir}: a {kind} tokenizer is not supported for this architecture; expected {' or '.join(kinds)}")
    if kind == "sentencepiece":
        return load_sentencepiece(model_dir, vocab_size, embedding_rows)
    tok_json = model_dir / "tokenizer.json"
    if not tok_json.is_file():
        raise InputFileError(model_dir, "has neither tokenizer.model nor tokenizer.json", "copy the model's tokenizer files into the directory")
    if _is_sentencepiece_style_json(tok_json):
        raise UnsupportedError(
            f"{tok_json}: a SentencePiece-style (byte-fallback) tokenizer.json without tokenizer.model; copy the"
            " model's tokenizer.model into the directory"
        )
    return load_bpe(model_dir, vocab_size, embedding_rows, pre_override)


def check_vocab_size(source: Path, n_defined: int, embedding_rows: int) -> None:
    """Raise unless a tokenizer defining ``n_defined`` ids plausibly covers the embedding matrix."""
    allowed = max(MAX_PADDING_ROWS, int(embedding_rows * MAX_PADDING_FRACTION))
    if n_defined > embedding_rows or embedding_rows - n_defined > allowed:
        raise InputFileError(
            source,
            f"defines {n_defined} tokens but the token embedding has {embedding_rows} rows",
            "the tokenizer was probably saved without its vocabulary (only special tokens); save the full tokenizer with the model",
        )


def write_vocab(writer: Any, vocab: Vocab) -> None:
    """Add the tokenizer keys to a ``gguf.GGUFWriter`` in llama.cpp's order."""
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.token_types)
    special = vocab.special
    write_special_tokens(writer, special)
    if special.lowercase is not None:
        writer.add_bool("tokenizer.ggml.normalizer.lowercase", special.lowercase)
    if special.strip_accents is not None:
        writer.add_bool("tokenizer.ggml.normalizer.strip_accents", special.strip_accents)


def write_special_tokens(writer: Any, special: SpecialTokens) -> None:
    """The keys gguf-py's ``SpecialVocab.add_to_gguf`` writes (merges, ids, add flags, chat templates), in its order."""
    if special.merges:
        writer.add_token_merges(special.merges)
    for typ, tid in special.ids.items():
        if typ in ID_KEYS:
            writer.add_uint32(ID_KEYS[typ], tid)
    for typ, flag in special.add.items():
        if typ in ADD_KEYS:
            writer.add_bool(ADD_KEYS[typ], flag)
    _write_chat_template(writer, special.chat_template)


def _write_chat_template(writer: Any, template: str | list[dict[str, str]] | None) -> None:
    if template is None:
        return
    if isinstance(template, str):
        writer.add_string(Keys.Tokenizer.CHAT_TEMPLATE, template)
        return
    default: str | None = None
    named: dict[str, str] = {}
    for choice in template:
        name = "".join(c if c.isascii() and c.isalnum() else "_" for c in choice.get("name", ""))
        if name and choice.get("template") is not None:
            if name == "default":
                default = choice["template"]
            else:
                named[name] = choice["template"]
    for name in sorted(named):
        writer.add_string(Keys.Tokenizer.CHAT_TEMPLATE_N.format(name=name), named[name])
    if named:
        writer.add_array(Keys.Tokenizer.CHAT_TEMPLATES, sorted(named))
    if default is not None:
        writer.add_string(Keys.Tokenizer.CHAT_TEMPLATE, default)
