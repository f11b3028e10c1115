"""`quantmill run --dry-run` costs a release from config.json alone: each stage's disk, time and peak memory for the
model's real shape (Llama-3.1-8B and Alfred-40B's configurations, shipped in docs/configs), and a memory budget
turns the layer-by-layer stages' peaks into their spilled ones; a run the memory cannot hold is refused before work."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from quantmill.cli import main
from quantmill.pipeline.runner import machine_memory
from quantmill.quantize.cost import KEEP_BYTES, ModelShape, gptq_peak

CONFIGS = Path(__file__).resolve().parents[2] / "docs" / "configs"


def _recipe(root: Path, config: str, **changes: Any) -> Path:
    model = root / "model"
    model.mkdir(parents=True)
    shutil.copyfile(CONFIGS / config, model / "config.json")
    data: dict[str, Any] = {
        "name": "big", "source": {"kind": "local", "path": "model"},
        "calibration": {"corpus": "bundled", "samples": 128, "seqlen": 2048, "seed": 0},
        "gptq": {"branches": [{"bits": 4, "group_size": 128, "main": True}, {"bits": 4, "group_size": 32},
                              {"bits": 8, "group_size": 128}]},
        "gguf": {"base": "f16", "types": ["Q4_K_M"], "imatrix": True},
        "verify": {"n_ctx": 512, "max_chunks": 4}, "work_dir": "work", **changes}
    path = root / "release.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _plan(recipe: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """The --json plan; exit 2 exactly when a run here would be refused (the plan is printed either way)."""
    code = main(["run", str(recipe), "--dry-run", "--json"])
    out, err = capsys.readouterr()
    report: dict[str, Any] = json.loads(out)
    assert code == (2 if report["notes"] else 0) and (not report["notes"] or report["notes"][0] in err), err
    assert not (recipe.parent / "work").exists()  # a plan writes nothing
    return report


def test_llama_3_1_8b_is_costed_from_its_config_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = _plan(_recipe(tmp_path, "llama-3.1-8b.json"), capsys)
    rows = {r["stage"]: r for r in report["stages"]}
    assert all(r["estimated_memory"] for r in rows.values()), rows
    # 8.03B parameters: transformers' own decoder layer on the meta device, times 32, plus two 128256 x 4096 matrices
    layer = 4096 * (4096 + 2 * 1024 + 4096) + 3 * 4096 * 14336 + 2 * 4096
    shape = ModelShape(32 * layer + 2 * 128256 * 4096 + 4096, 32, layer, 4096, 14336, 128256)
    assert rows["source"]["estimated_bytes"] == 2 * shape.n_params  # bf16 on disk
    want = gptq_peak(shape.pass_shape(128, 2048, 4096), 3, False, KEEP_BYTES)
    assert rows["gptq"]["estimated_memory"] == want and want > 3 * 128 * 2048 * 4096 * 4  # three branches' streams
    assert rows["verify"]["estimated_memory"] > 4 * shape.n_params  # the float32 reference
    refused = max(r["estimated_memory_required"] for r in rows.values()) > machine_memory()
    assert any("of memory, more than" in n for n in report["notes"]) == refused
    # the GGUFs verify and llama_model_quantize map are page cache, not memory the stage needs free
    assert rows["gguf-Q4_K_M"]["estimated_memory_required"] < rows["gguf-Q4_K_M"]["estimated_memory"]
    assert rows["gptq"]["estimated_bytes"] > 3 * 2 * 128 * 2048 * 4096 * 4  # three streams' checkpoints, twice


def test_a_memory_budget_plans_the_spilled_peak_and_a_run_it_cannot_hold_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = {r["stage"]: r for r in _plan(_recipe(tmp_path / "plain", "llama-3.1-8b.json"), capsys)["stages"]}
    budgeted = _plan(_recipe(tmp_path / "budget", "llama-3.1-8b.json", resources={"memory": "12GB"}), capsys)
    rows = {r["stage"]: r for r in budgeted["stages"]}
    assert rows["gptq"]["estimated_memory"] < 12e9 < plain["gptq"]["estimated_memory"]
    assert (rows["imatrix"]["estimated_memory"] < 12e9 if plain["imatrix"]["estimated_memory"] > 12e9
            else rows["imatrix"]["estimated_memory"] == plain["imatrix"]["estimated_memory"])
    assert any("stage verify needs about" in n and "resources.memory (12.0 GB)" in n for n in budgeted["notes"])
    # a real run is refused before any work, in one line
    recipe = _recipe(tmp_path / "run", "llama-3.1-8b.json", resources={"memory": "12GB"})
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no .safetensors weights" in err  # a config alone plans, never runs
    assert not (recipe.parent / "work").exists()


def test_alfred_40b_refinedweb_config_is_costed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    branches = [{"bits": b, "group_size": g} for b, g in ((4, -1), (4, 128), (4, 32), (3, 128), (3, 32), (8, -1), (8, 128))]
    branches[0]["main"] = True
    report = _plan(_recipe(tmp_path, "alfred-40b.json", gptq={"branches": branches}, resources={"memory": "200GB"}), capsys)
    rows = {r["stage"]: r for r in report["stages"]}
    source = rows["source"]["estimated_bytes"] / 2  # parameters, bf16
    assert 41e9 < source < 42.5e9  # Falcon-40B: 41.8B parameters
    assert rows["gptq"]["estimated_memory"] < 200e9  # seven branches' streams (8.6 GB each) spilled
    short = report["disk_needed_bytes"] > report["disk_free_bytes"]
    assert any("needs about" in n and "free under" in n for n in report["notes"]) == short  # this machine's disk


def test_max_memory_on_the_command_line_is_the_recipes_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    budgeted = _plan(_recipe(tmp_path / "recipe", "llama-3.1-8b.json", resources={"memory": "12GB"}), capsys)
    recipe = _recipe(tmp_path / "flag", "llama-3.1-8b.json")
    main(["run", str(recipe), "--dry-run", "--json", "--max-memory", "12GB"])
    flagged = json.loads(capsys.readouterr().out)
    assert [r["estimated_memory"] for r in flagged["stages"]] == [r["estimated_memory"] for r in budgeted["stages"]]
    assert main(["run", str(recipe), "--dry-run", "--max-memory", "twelve"]) == 2
    assert "'twelve' is not a size" in capsys.readouterr().err
