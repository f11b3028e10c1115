"""`quantmill run` end to end on a tiny model: byte-identical clean runs, a repeated run does nothing,
kill -9 at five random points then resume gives the same bytes, and `reproduce` says so.

Every stage kind runs (source, calibrate, gptq with two branches, gguf-base, imatrix, a K-quant,
verify, release), through the real CLI in subprocesses.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from release_helpers import (
    QUANTMILL,
    TINY_RECIPE,
    cli,
    make_tiny_model,
    output_hashes,
    run_and_check_release,
    tree_snapshot,
    write_recipe,
)

pytestmark = pytest.mark.slow
KILL_SEED = 20261124


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _recipe(root: Path, model: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return write_recipe(root, {**TINY_RECIPE, "source": {"kind": "local", "path": str(model)}})


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory, model: Path) -> dict[str, Any]:
    """One uninterrupted run: its directory, the --json report and the sha256 of every output file."""
    root = tmp_path_factory.mktemp("clean")
    recipe = _recipe(root, model)
    report, _ = run_and_check_release(recipe, cwd=root)
    assert [s["status"] for s in report["stages"]] == ["ran"] * len(report["stages"])
    return {"root": root, "recipe": recipe, "report": report, "hashes": output_hashes(root / "work" / "release")}


def test_release_has_every_artifact_and_a_complete_manifest(clean_run: dict[str, Any]) -> None:
    release = clean_run["root"] / "work" / "release"
    hashes = clean_run["hashes"]
    assert {"gguf/tiny-F16.gguf", "gguf/tiny-Q4_K_M.gguf", "gguf/README.md", "verify/verify.json", "manifest.json",
            "gptq/gptq-4bit-32g-actorder_True/model.safetensors", "gptq/gptq-8bit--1g-actorder_True/README.md"} <= set(hashes)
    manifest = json.loads((release / "manifest.json").read_text(encoding="utf-8"))
    assert set(manifest["inputs"]) >= {"source/model.safetensors", "source/config.json", "verify/eval_text.txt"}
    assert any(k.startswith("calibration/calib_") for k in manifest["inputs"])
    assert manifest["seeds"] == {"calibration": 7} and manifest["threads"] == 2
    assert len(manifest["calibration"]["token_sha256"]) == 64 and manifest["calibration"]["samples"] == 4
    assert manifest["packages"]["torch"] and manifest["packages"]["llama_cpp_python"]
    assert manifest["recipe"]["gguf"]["types"] == ["Q4_K_M"]
    assert manifest["verification"]["passed"] is True
    names = {a["name"] for a in manifest["verification"]["artifacts"]}
    assert names == {"reference", "F16", "Q4_K_M", "gptq-4bit-32g-actorder_True", "gptq-8bit--1g-actorder_True"}
    log = (clean_run["root"] / "work" / "quantmill.log").read_text(encoding="utf-8")
    assert "stage gptq finished" in log and "stage release finished" in log


def test_two_clean_runs_give_identical_bytes(clean_run: dict[str, Any], tmp_path: Path, model: Path) -> None:
    recipe = _recipe(tmp_path / "second", model)
    run_and_check_release(recipe)
    assert output_hashes(tmp_path / "second" / "work" / "release") == clean_run["hashes"]


def test_repeated_run_is_a_no_op(clean_run: dict[str, Any]) -> None:
    work = clean_run["root"] / "work"
    stages_before = tree_snapshot(work / "stages")
    release_before = tree_snapshot(work / "release")
    result = cli("run", str(clean_run["recipe"]), "--json", cwd=clean_run["root"], check=True)
    assert {s["status"] for s in json.loads(result.stdout)["stages"]} == {"done"}
    assert tree_snapshot(work / "stages") == stages_before
    assert tree_snapshot(work / "release") == release_before  # not even re-exported


def _wait_for_stage(log: Path, offset: int, stage: str, process: subprocess.Popen[bytes], timeout: float = 300) -> bool:
    """Wait until this run logs that ``stage`` started; False if the run ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.is_file() and f"stage {stage} (" in log.read_text(encoding="utf-8")[offset:]:
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.05)
    raise AssertionError(f"stage {stage} did not start within {timeout} s")


def test_kill_9_at_five_random_points_then_resume(clean_run: dict[str, Any], tmp_path: Path, model: Path) -> None:
    """Five kills at random points of the run: five different stages drawn at random (longer ones
    likelier), each killed a random fraction of its clean-run duration after it starts; then one
    run to the end."""
    recipe = _recipe(tmp_path / "killed", model)
    work = tmp_path / "killed" / "work"
    log = work / "quantmill.log"
    seconds = {s["stage"]: s["seconds"] for s in clean_run["report"]["stages"]}
    order = list(seconds)
    rng = random.Random(KILL_SEED)
    # five different stages, longer ones likelier (weights: duration + 0.5 s), in pipeline order
    pool, targets = list(order), []
    for _ in range(5):
        targets.append(rng.choices(pool, weights=[seconds[s] + 0.5 for s in pool])[0])
        pool.remove(targets[-1])
    targets.sort(key=order.index)
    kills = []
    for stage in targets:
        offset = log.stat().st_size if log.is_file() else 0
        process = subprocess.Popen([*QUANTMILL, "run", str(recipe)], cwd=recipe.parent, start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = _wait_for_stage(log, offset, stage, process)
        # early in the stage: a stage can run faster than in the clean run, and a kill that comes after
        # the whole rest of the run has finished leaves nothing for the later kills
        delay = rng.uniform(0.05, 0.4) * seconds[stage]
        time.sleep(delay)
        alive = process.poll() is None
        if alive:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        done = sorted(p.name.rsplit("-", 1)[0] for p in (work / "stages").glob("*") if (p / ".stage.json").is_file())
        kills.append({"stage": stage, "after_s": round(delay, 2), "killed_mid_stage": started and alive,
                      "stages_done_after": done, "temporaries": sorted(p.name for p in (work / "stages").glob(".*.part"))})
    print(json.dumps(kills, indent=1))
    assert sum(k["killed_mid_stage"] for k in kills) >= 3, kills
    assert any(k["temporaries"] for k in kills)  # the kills did leave half-written stages behind
    result = cli("run", str(recipe), "--json", cwd=recipe.parent, check=True)
    assert json.loads(result.stdout)["verification_passed"] is True
    assert output_hashes(work / "release") == clean_run["hashes"]
    assert not list(work.rglob("*.part")), "temporaries of the killed runs were left behind"


def test_reproduce_reports_every_file_identical(clean_run: dict[str, Any], tmp_path: Path) -> None:
    manifest = clean_run["root"] / "work" / "release" / "manifest.json"
    result = cli("reproduce", str(manifest), "--work-dir", str(tmp_path / "again"), "--json", cwd=tmp_path, check=True)
    report = json.loads(result.stdout)
    assert report["identical"] is True
    outputs = {row["path"]: row["status"] for row in report["outputs"]}
    assert set(outputs) == set(clean_run["hashes"]) - {"manifest.json"}
    assert set(outputs.values()) == {"identical"} and {r["status"] for r in report["inputs"]} == {"identical"}
    text = cli("reproduce", str(manifest), "--work-dir", str(tmp_path / "again"), cwd=tmp_path)
    assert text.returncode == 2 and "fresh work directory" in text.stderr  # never compares a run with itself


def test_reproduce_names_each_differing_file(clean_run: dict[str, Any]) -> None:
    from quantmill.manifest import compare_files

    outputs = json.loads((clean_run["root"] / "work" / "release" / "manifest.json").read_text(encoding="utf-8"))["outputs"]
    changed = {**{k: v["sha256"] for k, v in outputs.items()}, "gguf/tiny-Q4_K_M.gguf": "0" * 64, "extra.bin": "1" * 64}
    changed.pop("gguf/README.md")
    status = {c.path: c.status for c in compare_files(outputs, changed)}
    assert status["gguf/tiny-Q4_K_M.gguf"] == "different" and status["gguf/README.md"] == "missing"
    assert status["extra.bin"] == "extra" and status["gguf/tiny-F16.gguf"] == "identical"


def test_adapters_and_rope_are_merged_and_baked_before_conversion(model: Path, tmp_path: Path) -> None:
    """A recipe with a LoRA adapter and RoPE scaling: merge (PEFT's result) → bake → GGUF keys → manifest."""
    import gguf
    import torch
    from merge_helpers import (
        load_model,
        logits,
        peft_logits,
        token_batch,
        train_adapter,
    )

    from quantmill.pipeline.plan import build_plan
    from quantmill.pipeline.runner import run_recipe
    from quantmill.recipe_load import load_recipe

    adapter = train_adapter(model, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    recipe = write_recipe(tmp_path, {
        **TINY_RECIPE, "source": {"kind": "local", "path": str(model)}, "gptq": None,
        "gguf": {"base": "f16", "types": [], "vocab_pre": "smollm"},
        "adapters": [{"path": str(adapter), "weight": 1.0}],
        "rope": {"method": "linear", "factor": 2.0},
    })
    loaded = load_recipe(recipe)
    assert [n.name for n in build_plan(loaded).nodes] == ["source", "merge", "bake", "gguf-base", "verify", "release"]
    run_recipe(loaded)
    merged = next((tmp_path / "work" / "stages").glob("merge-*")) / "tiny"
    baked = next((tmp_path / "work" / "stages").glob("bake-*")) / "tiny"
    ids = token_batch(400)
    torch.testing.assert_close(logits(load_model(merged), ids), peft_logits(model, adapter, ids), rtol=1e-4, atol=1e-4)
    config = json.loads((baked / "config.json").read_text(encoding="utf-8"))
    assert config["rope_scaling"]["factor"] == 2.0 and config["max_position_embeddings"] == 512
    reader = gguf.GGUFReader(tmp_path / "work" / "release" / "gguf" / "tiny-F16.gguf")
    assert reader.fields["llama.rope.scaling.factor"].contents() == 2.0
    manifest = json.loads((tmp_path / "work" / "release" / "manifest.json").read_text(encoding="utf-8"))
    assert "adapters/0/adapter_model.safetensors" in manifest["inputs"]
    assert manifest["recipe"]["rope"]["method"] == "linear"
