"""Special tokens, add flags, merges and chat templates read from HF tokenizer files."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from quantmill.convert.special_tokens import read_special_tokens
from quantmill.convert.vocab import Vocab, write_vocab
from quantmill.errors import InputFileError

ADDED = [
    {"id": 0, "content": "<s>", "special": True},
    {"id": 1, "content": "</s>", "special": True},
    {"id": 2, "content": "<unk>", "special": True},
    {"id": 3, "content": "<pad>", "special": True},
]


def write(directory: Path, tokenizer: dict | None = None, config: dict | None = None, model_config: dict | None = None) -> Path:
    if tokenizer is not None:
        (directory / "tokenizer.json").write_text(json.dumps({"added_tokens": ADDED, "model": {"merges": []}, **tokenizer}))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if model_config is not None:
        (directory / "config.json").write_text(json.dumps(model_config))
    return directory


def template(single: list[str], pair: list[str]) -> dict:
    def seq(items: list[str]) -> list[dict]:
        return [{"Sequence": {"id": i}} if i in ("A", "B") else {"SpecialToken": {"id": i}} for i in items]

    return {"type": "TemplateProcessing", "single": seq(single), "pair": seq(pair)}


def test_llama_style_template_adds_bos_not_sep(tmp_path: Path) -> None:
    write(tmp_path, {"post_processor": template(["<s>", "A"], ["<s>", "A", "<s>", "B"])}, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    special = read_special_tokens(tmp_path)
    assert special.add == {"bos": True, "sep": False}
    assert special.ids == {"bos": 0, "eos": 1, "unk": 2}


def test_bytelevel_post_processor_wins_over_tokenizer_config(tmp_path: Path) -> None:
    post = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    write(tmp_path, {"post_processor": post}, {"add_bos_token": True, "add_eos_token": False, "pad_token": {"content": "<pad>"}})
    special = read_special_tokens(tmp_path)
    assert special.add == {"bos": False, "eos": False}
    assert special.ids == {"pad": 3}


def test_roberta_processing_and_config_json_ids(tmp_path: Path) -> None:
    write(tmp_path, {"post_processor": {"type": "RobertaProcessing", "sep": ["</s>", 1], "cls": ["<s>", 0]}}, {"bos_token": "<s>"}, {"eos_token_id": 1, "pad_token_id": 3, "bos_token_id": 7})
    special = read_special_tokens(tmp_path)
    assert special.add == {"bos": True, "eos": True, "sep": True}
    assert special.ids == {"bos": 0, "sep": 1, "cls": 0, "eos": 1, "pad": 3}


def test_trailing_special_token_becomes_eos_and_old_eos_becomes_eot(tmp_path: Path) -> None:
    write(tmp_path, {"post_processor": template(["<s>", "A", "<pad>"], [])}, {"bos_token": "<s>", "eos_token": "</s>"})
    special = read_special_tokens(tmp_path)
    assert special.add == {"bos": True, "eos": True}
    assert special.ids["eos"] == 3 and special.ids["eot"] == 1


def test_ids_beyond_the_vocabulary_are_dropped_and_negative_ids_refused(tmp_path: Path) -> None:
    write(tmp_path, None, None, {"bos_token_id": 5, "eos_token_id": 1})
    assert read_special_tokens(tmp_path, n_vocab=4).ids == {"eos": 1}
    write(tmp_path, None, None, {"bos_token_id": -1})
    with pytest.raises(InputFileError, match="negative id"):
        read_special_tokens(tmp_path)


def test_pair_merges_encode_spaces(tmp_path: Path) -> None:
    write(tmp_path, {"model": {"merges": [["a", "b"], ["c d", "e"]]}})
    assert read_special_tokens(tmp_path, load_merges=True).merges == ["a b", "c\u0120d e"]


def test_chat_templates_from_jinja_files_are_written_sorted(tmp_path: Path) -> None:
    write(tmp_path, {}, {"bos_token": "<s>"})
    (tmp_path / "chat_template.jinja").write_text("DEFAULT")
    (tmp_path / "additional_chat_templates").mkdir()
    for name in ("tool_use", "rag"):
        (tmp_path / "additional_chat_templates" / f"{name}.jinja").write_text(name.upper())
    special = read_special_tokens(tmp_path)
    assert special.chat_template == [
        {"name": "default", "template": "DEFAULT"}, {"name": "rag", "template": "RAG"}, {"name": "tool_use", "template": "TOOL_USE"},
    ]
    writer = gguf.GGUFWriter(None, "llama")
    write_vocab(writer, Vocab("gpt2", "gpt-2", ["a"], [1], tmp_path / "tokenizer.json", 1, special=special))
    kv = writer.kv_data[0]
    assert kv["tokenizer.chat_template"].value == "DEFAULT"
    assert kv["tokenizer.chat_templates"].value == ["rag", "tool_use"]
    assert kv["tokenizer.chat_template.tool_use"].value == "TOOL_USE"
