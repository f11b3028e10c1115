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



# Tokenizer directories as the tests above build them: (tokenizer.json extras, tokenizer_config.json,
# config.json, n_vocab). Each is also read by gguf-py's SpecialVocab, whose keys must be ours bit for bit.
SPECIAL_VOCAB_CASES: dict[str, tuple[dict | None, dict | None, dict | None, int | None]] = {
    "llama_template": ({"post_processor": template(["<s>", "A"], ["<s>", "A", "<s>", "B"])},
                       {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, None, None),
    "bytelevel": ({"post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}},
                  {"add_bos_token": True, "add_eos_token": False, "pad_token": {"content": "<pad>"}}, None, None),
    "roberta": ({"post_processor": {"type": "RobertaProcessing", "sep": ["</s>", 1], "cls": ["<s>", 0]}}, {"bos_token": "<s>"},
                {"eos_token_id": 1, "pad_token_id": 3, "bos_token_id": 7}, None),
    "trailing_eos_eot": ({"post_processor": template(["<s>", "A", "<pad>"], [])}, {"bos_token": "<s>", "eos_token": "</s>"}, None, None),
    "bert_pair_sep": ({"post_processor": template(["<s>", "A", "</s>"], ["<s>", "A", "</s>", "B", "</s>"])},
                      {"cls_token": "<s>", "sep_token": "</s>", "chat_template": "{{ messages }}"}, None, None),
    "beyond_vocab": (None, None, {"bos_token_id": 5, "eos_token_id": 1}, 4),
    "pair_merges": ({"model": {"merges": [["a", "b"], ["c d", "e"]]}}, None, None, None),
}
# Runs in llama.cpp's own gguf-py (PYTHONPATH): the SpecialVocab its converter uses. The PyPI gguf of the
# same version number is older (no add-BOS/EOS from a ByteLevel post-processor, e.g. SmolLM2's).
SPECIAL_VOCAB_SCRIPT = """
import json, sys, gguf
out = []
for model_dir, n_vocab, merges in json.loads(sys.argv[1]):
    writer = gguf.GGUFWriter(None, "llama")
    gguf.SpecialVocab(model_dir, load_merges=merges, n_vocab=n_vocab).add_to_gguf(writer, quiet=True)
    out.append([[k, v.value, int(v.type)] for k, v in writer.kv_data[0].items()])
print(json.dumps(out))
"""


def assert_same_keys_as_special_vocab(cases: list[tuple[Path, int | None]]) -> None:
    import os
    import subprocess
    import sys

    from quantmill.convert.vocab import write_special_tokens
    from quantmill.reference_tools import llama_cpp_source_dir

    gguf_py = llama_cpp_source_dir() / "gguf-py"
    if not (gguf_py / "gguf" / "vocab.py").is_file():
        pytest.skip(f"llama.cpp's gguf-py not found at {gguf_py}; set QUANTMILL_LLAMA_CPP_DIR")
    runs = [(str(d), n, merges) for d, n in cases for merges in (False, True)]
    proc = subprocess.run([sys.executable, "-c", SPECIAL_VOCAB_SCRIPT, json.dumps(runs)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(gguf_py)}, timeout=300, check=True)
    for (model_dir, n_vocab, merges), theirs in zip(runs, json.loads(proc.stdout), strict=True):
        writer = gguf.GGUFWriter(None, "llama")
        write_special_tokens(writer, read_special_tokens(Path(model_dir), n_vocab=n_vocab, load_merges=merges))
        ours = [[k, v.value, int(v.type)] for k, v in writer.kv_data[0].items()]
        assert json.loads(json.dumps(ours)) == theirs, (model_dir, merges)


def test_keys_equal_llama_cpp_special_vocab(tmp_path: Path, smollm2_tokenizer_dir: Path, sentencepiece_tokenizer_dir: Path) -> None:
    cases: list[tuple[Path, int | None]] = [(smollm2_tokenizer_dir, 49152), (sentencepiece_tokenizer_dir, None)]
    for name, (tokenizer, config, model_config, n_vocab) in sorted(SPECIAL_VOCAB_CASES.items()):
        (tmp_path / name).mkdir()
        cases.append((write(tmp_path / name, tokenizer, config, model_config), n_vocab))
    assert_same_keys_as_special_vocab(cases)
