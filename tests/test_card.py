"""Model cards: Hub metadata, "Provided files" tables read from the finished artifacts, parity table."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from tiny_gguf import bpe_vocab, write_tiny_gguf

from quantmill.pipeline.release import hub_layout, render_cards

BRANCH_4 = "gptq-4bit-32g-actorder_True"
BRANCH_8 = "gptq-8bit--1g-actorder_False"
MODEL = {"model_type": "llama", "n_layers": 2, "n_kv_heads": 2, "head_dim": 16, "hidden_size": 64}


def _branch(root: Path, name: str, bits: int, group: int, desc_act: bool, size: int) -> None:
    directory = root / "gptq" / name
    directory.mkdir(parents=True)
    qconfig = {"bits": bits, "group_size": group, "desc_act": desc_act, "damp_percent": 0.02,
               "meta": {"calibration": {"source": "bundled", "seqlen": 256, "samples": 8}}}
    (directory / "quantize_config.json").write_text(json.dumps(qconfig), encoding="utf-8")
    (directory / "model.safetensors").write_bytes(bytes(size))


def _artifact(name: str, bpw: float, delta: float, passed: bool) -> dict[str, Any]:
    """One record of verify's report (quantmill.verify.report.artifact_record), as the verify stage writes it."""
    return {"name": name, "path": f"gguf/tiny-{name}.gguf", "format": "gguf", "quant_type": name, "size_bytes": 1000,
            "bpw": bpw, "is_reference": False, "passed": passed, "verdict": "pass" if passed else "FAIL",
            "failures": [] if passed else ["delta_ppl_pct 40 (limit <= 25)"], "tokenization": None,
            "ppl": 10.0 * (1 + delta / 100), "ppl_stderr": 0.1, "delta_ppl_pct": delta, "kld_mean": 0.01,
            "kld_p99": 0.1, "top1_agreement": 0.9}


@pytest.fixture
def release(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    root = tmp_path / "release"
    _branch(root, BRANCH_4, 4, 32, True, 3_000_000)
    _branch(root, BRANCH_8, 8, -1, False, 5_000_000)
    (root / "gguf").mkdir(parents=True)
    write_tiny_gguf(root / "gguf" / "tiny-Q8_0.gguf", bpe_vocab(), tied=True, matrix_type="Q8_0")
    write_tiny_gguf(root / "gguf" / "tiny-F16.gguf", bpe_vocab(), tied=True, matrix_type="F16")
    report = {"text": "bundled:eval_text.txt", "n_ctx": 64, "n_chunks": 4, "n_tokens": 256, "n_text_tokens": 1000,
              "token_sha256": "ab" * 32, "device": "cpu", "threads": 2, "passed": False, "artifacts": [
                  {"name": "reference", "path": "tiny", "format": "hf", "quant_type": "F32", "size_bytes": 2000,
                   "bpw": 32.0, "is_reference": True, "passed": None, "verdict": "reference", "failures": [],
                   "tokenization": None, "ppl": 10.0, "ppl_stderr": 0.1, "delta_ppl_pct": 0.0},
                  _artifact("F16", 16.01, 0.001, True), _artifact("Q8_0", 8.51, 0.5, True),
                  _artifact(BRANCH_4, 4.6, 3.0, True), _artifact(BRANCH_8, 8.3, 40.0, False)]}
    recipe = {"card": {"name": "Tiny-Chat", "creator": "Some Lab", "base_model": "somelab/Tiny-Chat", "quantized_by": "me",
                       "license": "apache-2.0", "prompt_template": "<|user|>\n{prompt}\n<|assistant|>\n", "tags": ["chat"]},
              "gptq": {"branches": [{"bits": 8, "group_size": -1, "act_order": False},
                                    {"bits": 4, "group_size": 32, "act_order": True, "main": True}]}}
    manifest = {"name": "tiny", "recipe": recipe, "model": MODEL, "verification": report}
    return root, manifest


def _cards(release: tuple[Path, dict[str, Any]]) -> dict[str, str]:
    root, manifest = release
    return render_cards(root, manifest, gptq_repo="me/Tiny-Chat-GPTQ", gguf_repo="me/Tiny-Chat-GGUF",
                        published=hub_layout(manifest, root))


def _front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _rows(card: str, header: str) -> list[list[str]]:
    lines = card.splitlines()
    start = lines.index(header)
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


GPTQ_HEADER = ("| Branch | Bits | GS | Act Order | Damp % | Grid | GPTQ Dataset | Seq Len | Size | ExLlama | Format "
               "| Runs in | Desc |")
GGUF_HEADER = "| Name | Quant method | Bits | Size | Max RAM required | Use case |"


def test_cards_carry_the_hub_metadata(release: tuple[Path, dict[str, Any]]) -> None:
    for path, card in _cards(release).items():
        meta = _front_matter(card)
        assert meta["base_model"] == "somelab/Tiny-Chat" and meta["base_model_relation"] == "quantized", path
        assert meta["quantized_by"] == "me" and meta["license"] == "apache-2.0" and meta["model_creator"] == "Some Lab"
        assert meta["model_name"] == "Tiny-Chat" and meta["prompt_template"] == "<|user|>\n{prompt}\n<|assistant|>\n"
        assert "quantmill" in meta["tags"] and "chat" in meta["tags"]
        assert ("gptq" in meta["tags"]) == path.startswith("gptq/") and ("gguf" in meta["tags"]) == path.startswith("gguf/")


def test_gptq_table_is_read_from_the_branches(release: tuple[Path, dict[str, Any]]) -> None:
    cards = _cards(release)
    card = cards[f"gptq/{BRANCH_4}/README.md"]
    rows = {r[0].split("]")[0].lstrip("["): r for r in _rows(card, GPTQ_HEADER)}
    assert set(rows) == {"main", BRANCH_8}  # the variant marked main is published as main
    assert rows["main"][1:11] == ["4", "32", "Yes", "0.02", "min/max", "bundled", "256", "3.0 MB", "Yes", "GPTQ (v1)"]
    assert rows[BRANCH_8][1:10] == ["8", "None", "No", "0.02", "min/max", "bundled", "256", "5.0 MB", "No"]
    assert rows["main"][11] == "transformers + GPTQModel, vLLM, TGI, ExLlama"  # 4-bit symmetric, llama family
    assert rows[BRANCH_8][11] == "transformers + GPTQModel, vLLM"
    assert "Δppl +3.00%, passed" in rows["main"][12] and "FAILED verification" in rows[BRANCH_8][12]
    assert "This branch: `main`" in card and f"This branch: `{BRANCH_8}`" in cards[f"gptq/{BRANCH_8}/README.md"]
    assert f"--branch {BRANCH_8} https://huggingface.co/me/Tiny-Chat-GPTQ" in card  # how to download a branch
    # the table follows the files, not the recipe: a bigger file shows a bigger size
    (release[0] / "gptq" / BRANCH_8 / "model.safetensors").write_bytes(bytes(7_000_000))
    rows = {r[0].split("]")[0].lstrip("["): r for r in _rows(_cards(release)[f"gptq/{BRANCH_4}/README.md"], GPTQ_HEADER)}
    assert rows[BRANCH_8][8] == "7.0 MB"


def test_gptq_table_shows_each_branchs_grid(release: tuple[Path, dict[str, Any]]) -> None:
    """The Grid column comes from quantize_config.json: min/max when it names none, the mse search with its range."""
    config_path = release[0] / "gptq" / BRANCH_8 / "quantize_config.json"
    qconfig = json.loads(config_path.read_text(encoding="utf-8"))
    qconfig.update({"grid": "mse", "grid_shrink_range": [0.2, 1.0], "grid_steps": 80})
    config_path.write_text(json.dumps(qconfig), encoding="utf-8")
    rows = {r[0].split("]")[0].lstrip("["): r for r in _rows(_cards(release)[f"gptq/{BRANCH_4}/README.md"], GPTQ_HEADER)}
    assert rows["main"][5] == "min/max" and rows[BRANCH_8][5] == "mse (0.2–1, 80 steps)"


def test_clients_follow_format_bits_symmetry_and_family(release: tuple[Path, dict[str, Any]]) -> None:
    from quantmill.card import GptqBranchInfo

    def clients(model_type: str, **changes: Any) -> list[str]:
        fields = {"name": "b", "bits": 4, "group_size": 128, "desc_act": True, "damp_percent": 0.01, "dataset": "d",
                  "seqlen": 8, "size_bytes": 1, **changes}
        return GptqBranchInfo(**fields).clients(model_type)

    assert clients("mistral") == ["transformers + GPTQModel", "vLLM", "TGI", "ExLlama"]
    assert clients("falcon") == ["transformers + GPTQModel", "vLLM", "TGI"]  # ExLlama runs llama-family models only
    assert clients("llama", sym=False) == ["transformers + GPTQModel"]
    assert clients("llama", bits=3) == ["transformers + GPTQModel", "vLLM"]
    assert clients("llama", format="compressed-tensors") == ["transformers + compressed-tensors", "vLLM"]
    root, manifest = release  # the model type comes from the manifest
    card = render_cards(root, {**manifest, "model": {**MODEL, "model_type": "falcon"}}, gptq_repo="a/b", gguf_repo="a/c",
                        published=hub_layout(manifest, root))[f"gptq/{BRANCH_4}/README.md"]
    assert {r[0].split("]")[0].lstrip("["): r[9] for r in _rows(card, GPTQ_HEADER)}["main"] == "No"


def test_gguf_card_says_where_the_files_run_from_their_keys(release: tuple[Path, dict[str, Any]]) -> None:
    from importlib.metadata import version

    card = _cards(release)["gguf/README.md"]
    section = card.split("## Where these files run\n\n")[1].split("\n")[0]
    assert section.startswith("The files themselves say: GGUF v3, architecture `llama`, pre-tokenizer `smollm`, "
                              "tensor types F16, F32, Q8_0.")
    assert "knows the pre-tokenizer `smollm` (PR #8609, July 2024)" in section and "Ollama" in section
    assert f"llama-cpp-python {version('llama-cpp-python')}" in section
    assert "huggingface-cli download me/Tiny-Chat-GGUF tiny-" in card  # how to download one file


def test_gguf_table_is_read_from_the_files(release: tuple[Path, dict[str, Any]]) -> None:
    root, manifest = release
    card = _cards(release)["gguf/README.md"]
    rows = _rows(card, GGUF_HEADER)
    assert [r[1] for r in rows] == ["F16", "Q8_0"]  # largest first
    kv = 2 * 2 * 2 * 16 * 2048 * 2
    for row in rows:
        path = root / "gguf" / f"tiny-{row[1]}.gguf"
        size = path.stat().st_size
        assert row[3] == f"{size / 1e6:.1f} MB"
        assert row[4] == f"{(size + kv + 64 * 2**20) / 1e6:.1f} MB"
    assert rows[1][2] == "8.51" and "near lossless" in rows[1][5] and "Δppl +0.50%, passed" in rows[1][5]
    # without verification the bits per weight are read from the file itself
    unverified = {**manifest, "verification": None}
    card = render_cards(root, unverified, gptq_repo="a/b", gguf_repo="a/c", published=hub_layout(unverified, root))["gguf/README.md"]
    q8 = _rows(card, GGUF_HEADER)[1]
    assert q8[1] == "Q8_0" and 8.0 < float(q8[2]) < 9.0 and "not verified" in q8[5]
    assert "No verification was run" in card


def test_parity_table_and_plot_are_in_the_cards(release: tuple[Path, dict[str, Any]]) -> None:
    cards = _cards(release)
    gguf, gptq = cards["gguf/README.md"], cards[f"gptq/{BRANCH_4}/README.md"]
    assert "![Parity with the fp16 reference](parity.png)" in gguf and "(parity.png)" in gptq
    header = "| artifact | type | size MiB | bpw | ppl ± stderr | Δppl % | mean KLD | 99% KLD | same top % | verdict |"
    parity = _rows(gguf, header)
    assert [r[0] for r in parity] == ["reference", "F16", "Q8_0"]  # each card shows its own artifacts
    parity = _rows(gptq, header)
    assert [r[0] for r in parity] == ["reference", BRANCH_4, BRANCH_8]
    assert parity[2][-1].startswith("FAIL") and parity[1][-1] == "pass" and parity[0][-1] == "reference"
    assert f"{BRANCH_8} fails its {BRANCH_8} thresholds: delta_ppl_pct 40 (limit <= 25)" in gptq  # why it failed
    assert "KLD and top-1 against the reference" in gptq and "CPU, 2 threads" in gptq
