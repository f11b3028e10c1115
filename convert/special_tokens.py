"""Special tokens, add-BOS/EOS flags, merges and chat template of a Hugging Face tokenizer.

Reads ``tokenizer.json``, ``tokenizer_config.json``, ``config.json`` and the chat
template files as data and derives what llama.cpp's converter writes for them: the
special token ids (tokenizer_config names looked up among the added tokens, then
config.json ids), whether BOS/EOS/SEP are added (from the post-processor, then
tokenizer_config), the BPE merges and the chat template(s). That is ``gguf.SpecialVocab``
of llama.cpp's own gguf-py, which the PyPI ``gguf`` of the same version number predates
(it misses e.g. SmolLM2's ByteLevel add-BOS/EOS flags), so it is re-implemented here and
``tests/convert/test_special_tokens.py`` compares the written keys with llama.cpp's bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf.constants import Keys

from quantmill.errors import InputFileError
from quantmill.jsonio import read_json_object

SPECIAL_TYPES: tuple[str, ...] = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
# GGUF has id keys for these special types (cls has none) and add-flags for bos/eos/sep.
_T = Keys.Tokenizer
ID_KEYS: dict[str, str] = {
    "bos": _T.BOS_ID, "eos": _T.EOS_ID, "unk": _T.UNK_ID, "sep": _T.SEP_ID,
    "pad": _T.PAD_ID, "mask": _T.MASK_ID, "eot": _T.EOT_ID, "eom": _T.EOM_ID,
}
ADD_KEYS: dict[str, str] = {"bos": _T.ADD_BOS, "eos": _T.ADD_EOS, "sep": _T.ADD_SEP}


@dataclass
class SpecialTokens:
    """Ordered as llama.cpp adds them, so the GGUF keys come out in the same order."""

    ids: dict[str, int] = field(default_factory=dict)
    add: dict[str, bool] = field(default_factory=dict)
    merges: list[str] = field(default_factory=list)
    chat_template: str | list[dict[str, str]] | None = None
    lowercase: bool | None = None
    strip_accents: bool | None = None


def read_tokenizer_json(path: Path) -> dict[str, Any]:
    """A tokenizer (or model) JSON file as an object, through :mod:`quantmill.jsonio`."""
    return read_json_object(path, f"fix or re-save {path.name}")


def _token_content(entry: object) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def _encode_merges(merges: list[Any], path: Path) -> list[str]:
    if not merges or isinstance(merges[0], str):
        return list(merges)
    if isinstance(merges[0], list) and len(merges[0]) == 2:
        # Pair form (tokenizers >= 0.20); GGUF stores "a b", with a literal space shifted to U+0120.
        return [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair) for pair in merges]
    raise InputFileError(path, "model.merges has an unknown format", "re-save the tokenizer with a current tokenizers release")


class _Reader:
    def __init__(self, model_dir: Path, n_vocab: int | None, load_merges: bool) -> None:
        self.dir = model_dir
        self.n_vocab = n_vocab
        self.load_merges = load_merges
        self.types: tuple[str, ...] = SPECIAL_TYPES
        self.out = SpecialTokens()

    def set_id(self, typ: str, tid: object, source: Path) -> None:
        if not isinstance(tid, int) or isinstance(tid, bool):
            return
        if tid < 0:
            raise InputFileError(source, f"special token {typ} has negative id {tid}", "fix the token id")
        if (self.n_vocab is None or tid < self.n_vocab) and typ not in self.out.ids:
            self.out.ids[typ] = tid

    def normalizer(self, norm: dict[str, Any]) -> None:
        kind = norm.get("type")
        if kind == "Lowercase":
            self.out.lowercase = True
        elif kind == "StripAccents":
            self.out.strip_accents = True
        elif kind == "BertNormalizer":
            self.out.lowercase = norm.get("lowercase", self.out.lowercase)
            self.out.strip_accents = norm.get("strip_accents", self.out.strip_accents)
        elif kind == "Sequence":
            for sub in norm.get("normalizers", []):
                self.normalizer(sub)

    def template(self, proc: dict[str, Any], cfg: dict[str, Any] | None, named: dict[str, Any]) -> None:
        """Infer add-BOS/EOS/SEP from a TemplateProcessing post-processor."""
        single, pair = proc.get("single", []), proc.get("pair", [])
        first = last = None
        if len(single) > 1:
            first = single[0].get("SpecialToken", {}).get("id")
            if first:
                if not cfg:
                    named["bos"] = first
                elif first not in (named["bos"], named["cls"]):
                    for typ in ("bos", "cls"):
                        if not named[typ]:
                            cfg[f"{typ}_token"] = named[typ] = first
                self.out.add["bos"] = first in (named["bos"], named["cls"])
            last = single[-1].get("SpecialToken", {}).get("id")
            if last:
                if not cfg:
                    named["eos"] = last
                elif last != named["eos"]:
                    for extra in ("eot", "eom"):
                        if extra not in self.types:
                            self.types = (*self.types, extra)
                            cfg[f"{extra}_token"] = named["eos"]
                            break
                    cfg["eos_token"] = named["eos"] = last
                self.out.add["eos"] = last == named["eos"]
        if not pair:
            return
        start = 1 if first and pair[0].get("SpecialToken", {}).get("id") == first else 0
        stop = -1 if last and pair[-1].get("SpecialToken", {}).get("id") == last else None
        pair = pair[start:stop]
        if not pair or pair[0].get("Sequence", {}).get("id") != "A" or pair[-1].get("Sequence", {}).get("id") != "B":
            return
        middle = pair[1:-1]
        if not middle:
            return
        seps = (named["sep"], named["eos"])
        add_sep = False
        entry = middle[0].get("SpecialToken", {}).get("id")
        if entry and entry in seps and not last:
            add_sep = True
        second = middle[1].get("SpecialToken", {}).get("id") if len(middle) == 2 else None
        if second and second in seps:
            add_sep = True
        self.out.add["sep"] = add_sep
        if add_sep and not named["sep"] and cfg:
            cfg["sep_token"] = named["eos"]

    def post_processor(self, post: dict[str, Any], cfg: dict[str, Any] | None, named: dict[str, Any]) -> None:
        for proc in post.get("processors", [post]):
            kind = proc.get("type")
            if kind == "ByteLevel":
                self.out.add.setdefault("bos", False)
                self.out.add.setdefault("eos", False)
            elif kind == "RobertaProcessing":
                self.out.add.update(bos=True, eos=True, sep=True)
                if not named["cls"] and cfg:
                    cfg["cls_token"] = named["cls"] = proc.get("cls", [named["bos"]])[0]
                if not named["sep"] and cfg:
                    cfg["sep_token"] = named["sep"] = proc.get("sep", [named["eos"]])[0]
            elif kind == "TemplateProcessing":
                self.template(proc, cfg, named)

    def chat_template(self, cfg: dict[str, Any]) -> None:
        alt: str | list[dict[str, str]] | None = None
        jinja, as_json = self.dir / "chat_template.jinja", self.dir / "chat_template.json"
        if jinja.is_file():
            alt = jinja.read_text(encoding="utf-8")
            extra = sorted((self.dir / "additional_chat_templates").glob("*.jinja"))
            if extra:
                alt = [{"name": "default", "template": alt}]
                alt += [{"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in extra]
        elif as_json.is_file():
            alt = read_tokenizer_json(as_json).get("chat_template")
        template = cfg.get("chat_template", alt)
        if template is None or isinstance(template, (str, list)):
            self.out.chat_template = template

    def from_tokenizer_files(self) -> None:
        tok_path, cfg_path = self.dir / "tokenizer.json", self.dir / "tokenizer_config.json"
        tokenizer = read_tokenizer_json(tok_path) if tok_path.is_file() else None
        added: list[dict[str, Any]] = []
        if tokenizer:
            if self.load_merges:
                self.out.merges = _encode_merges(tokenizer.get("model", {}).get("merges") or [], tok_path)
            if norm := tokenizer.get("normalizer"):
                self.normalizer(norm)
            added = tokenizer.get("added_tokens", [])
        cfg: dict[str, Any] | None = read_tokenizer_json(cfg_path) if cfg_path.is_file() else None
        if tokenizer:
            # Raw values on purpose: a dict-valued entry never equals a token string here, as in llama.cpp.
            named: dict[str, Any] = {t: (cfg or {}).get(f"{t}_token") for t in ("bos", "cls", "eos", "sep")}
            if not named["bos"] and named["cls"] and cfg:
                cfg["bos_token"] = named["bos"] = named["cls"]
            if not named["eos"] and named["sep"] and cfg:
                cfg["eos_token"] = named["eos"] = named["sep"]
            if post := tokenizer.get("post_processor"):
                self.post_processor(post, cfg, named)
        if not cfg:
            return
        self.chat_template(cfg)
        for typ in self.types:
            flag = cfg.get(f"add_{typ}_token")
            if isinstance(flag, bool) and typ not in self.out.add:
                self.out.add[typ] = flag
            content = _token_content(cfg.get(f"{typ}_token"))
            if content is None:
                continue
            tid = next((a.get("id") for a in added if a.get("content") == content), None)
            self.set_id(typ, tid, cfg_path)

    def from_config(self) -> None:
        path = self.dir / "config.json"
        if not path.is_file():
            return
        config = read_tokenizer_json(path)
        for typ in self.types:
            tid = config.get(f"{typ}_token_id")
            if tid is None and isinstance(config.get("text_config"), dict):
                tid = config["text_config"].get(f"{typ}_token_id")
            self.set_id(typ, tid, path)

    def merges_txt(self) -> None:
        path = self.dir / "merges.txt"
        if not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines()
        if lines and lines[0].strip().startswith("#"):
            lines = lines[1:]
        self.out.merges = [" ".join(parts) for line in lines if len(parts := line.split()) == 2]


def read_special_tokens(model_dir: Path, *, n_vocab: int | None = None, load_merges: bool = False) -> SpecialTokens:
    """Special ids, add flags, chat template (and merges when asked) for the tokenizer in ``model_dir``."""
    reader = _Reader(Path(model_dir), n_vocab, load_merges)
    reader.from_tokenizer_files()
    reader.from_config()
    if load_merges and not reader.out.merges:
        reader.merges_txt()
    return reader.out
