"""release.yaml: `quantmill init` writes valid recipes; every malformed recipe is one clear error, exit 2,
and the work directory is left exactly as it was (or not created)."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import yaml
from release_helpers import TINY_RECIPE, tree_snapshot, write_recipe

from quantmill.cli import main
from quantmill.recipe import RecipeError, parse_size
from quantmill.recipe_load import load_recipe


def _fake_model(directory: Path) -> Path:
    """config.json and a one-tensor safetensors file: enough to validate and plan (nothing loads it)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}), encoding="utf-8")
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode()
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    return directory


@pytest.fixture
def root(tmp_path: Path) -> Path:
    _fake_model(tmp_path / "model")
    work = tmp_path / "work"
    (work / "stages").mkdir(parents=True)
    (work / "notes.txt").write_text("a file the user keeps here\n", encoding="utf-8")
    return tmp_path


def _with(path: str, value: Any) -> dict[str, Any]:
    """TINY_RECIPE with the dotted ``path`` set to ``value`` (None deletes the key)."""
    data = json.loads(json.dumps(TINY_RECIPE))
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return data


# (id, recipe data or raw YAML text, substrings the one-line error must contain)
MALFORMED: list[tuple[str, Any, tuple[str, ...]]] = [
    ("typo-top-level", {**_with("calibration", None), "calibraton": {"samples": 4}}, ("calibraton", "did you mean 'calibration'")),
    ("typo-nested", _with("gguf.typse", ["Q8_0"]), ("gguf.typse", "did you mean 'types'")),
    ("typo-in-branch", _with("gptq.branches.0.act_ordr", True), ("gptq.branches.0.act_ordr", "did you mean 'act_order'")),
    ("wrong-type-int", _with("calibration.samples", "many"), ("calibration.samples", "'many'", "integer")),
    ("wrong-type-threads", _with("threads", "two"), ("threads", "'two'")),
    ("wrong-type-list", _with("gguf.types", "Q4_K_M"), ("gguf.types", "list")),
    ("unknown-quant-type", _with("gguf.types", ["Q4_K_M", "Q4_K_X"]), ("gguf.types", "'Q4_K_X'", "not a GGUF quant type", "Q8_0")),
    ("unknown-gptq-bits", _with("gptq.branches.0.bits", 5), ("gptq.branches.0.bits", "5")),
    ("unknown-group-size", _with("gptq.branches.1.group_size", 100), ("gptq.branches.1.group_size", "100")),
    ("unknown-gptq-grid", _with("gptq.branches.0.grid", "best"), ("gptq.branches.0.grid", "'best'", "mse")),
    ("two-main-branches", _with("gptq.branches.1.main", True), ("both main", "at most one")),
    ("same-variant-twice", _with("gptq.branches", [{"bits": 4, "group_size": 32}, {"bits": 4, "group_size": 32}]), ("same variant",)),
    ("duplicate-gguf-type", _with("gguf.types", ["Q4_K_M", "q4_k_m"]), ("listed twice",)),
    ("imatrix-type-without-imatrix", _with("gguf", {"types": ["IQ2_XS"], "imatrix": False}), ("IQ2_XS", "imatrix: true")),
    ("branch-dataset-conflict", _with("gptq.branches.0.dataset", "other.txt"), ("conflicts with calibration.corpus",)),
    ("branch-seqlen-conflict", _with("gptq.branches.0.seqlen", 2048), ("gptq.branches.0.seqlen 2048", "conflicts")),
    ("no-artifacts", _with("gptq", None) | {"gguf": None}, ("makes no artifact",)),
    ("unknown-source-kind", _with("source", {"kind": "ftp", "path": "x"}), ("source", "ftp")),
    ("missing-source-dir", _with("source.path", "nope"), ("source.path 'nope'", "no config.json")),
    ("missing-calibration-file", _with("calibration.corpus", "missing.txt"), ("calibration.corpus 'missing.txt'", "no such file")),
    ("output-outside-work-dir", _with("output", "../../elsewhere"), ("output '../../elsewhere'", "outside the work directory")),
    ("output-absolute-elsewhere", _with("output", "/tmp/quantmill-elsewhere"), ("outside the work directory",)),
    ("unwritable-work-dir", _with("work_dir", "work/notes.txt/inner"), ("work_dir", "is a file, not a directory")),
    ("too-little-disk", _with("disk_reserve", "1000000TB"), ("disk_reserve", "free some space")),
    ("bad-size", _with("disk_reserve", "lots"), ("disk_reserve", "'lots'", "is not a size")),
    ("unknown-override-artifact", _with("verify.overrides", {"Q3_K_S": {"max_delta_ppl_pct": 1}}), ("verify.overrides", "Q3_K_S", "Q4_K_M")),
    ("negative-threshold", _with("verify.thresholds.max_delta_ppl_pct", -1), ("verify.thresholds.max_delta_ppl_pct", "-1")),
    ("renamed-threshold", _with("verify.thresholds.max_kl_divergence", 0.1), ("verify.thresholds.max_kl_divergence", "renamed", "'max_kld_mean'")),
    ("renamed-override", _with("verify.overrides", {"Q4_K_M": {"max_kl_divergence": 0.1}}), ("verify.overrides.Q4_K_M.max_kl_divergence", "'max_kld_mean'")),
    ("lckv-section", {**TINY_RECIPE, "lckv": {"layers": [0, 0]}}, ("lckv", "model_type lckv-llama")),
    ("unknown-rope-method", {**TINY_RECIPE, "rope": {"method": "warp", "factor": 2.0}}, ("rope.method", "'warp'", "yarn")),
    ("hub-target-without-repos", {**TINY_RECIPE, "publish": [{"kind": "hub"}]}, ("publish.0", "gguf_repo")),
    ("bad-hub-repo-id", {**TINY_RECIPE, "publish": [{"kind": "hub", "gguf_repo": "no-slash"}]}, ("publish.0.gguf_repo", "OWNER/NAME")),
    ("bad-release-name", _with("name", "my model!"), ("name", "'my model!'")),
    ("not-a-mapping", "- just\n- a list\n", ("a recipe is a YAML mapping",)),
    ("invalid-yaml", "name: tiny\ngptq: {branches: [\n", ("not valid YAML", "line")),
]


@pytest.mark.parametrize(("case", "data", "expected"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_recipe_is_one_clear_error(root: Path, capsys: pytest.CaptureFixture[str], case: str, data: Any,
                                             expected: tuple[str, ...]) -> None:
    if isinstance(data, str):
        recipe = root / "release.yaml"
        recipe.write_text(data, encoding="utf-8")
    else:
        recipe = write_recipe(root, data)
    before = tree_snapshot(root)
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("quantmill: error: ") and str(recipe) in lines[0], lines[0]
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    assert "Traceback" not in err
    assert tree_snapshot(root) == before  # nothing written, nothing touched


def test_malformed_recipe_does_not_create_work_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fake_model(tmp_path / "model")
    recipe = write_recipe(tmp_path, _with("gguf.types", ["Q9_K"]), work_dir="fresh-work")
    assert main(["run", str(recipe)]) == 2
    assert not (tmp_path / "fresh-work").exists()
    assert main(["run", str(tmp_path / "absent.yaml")]) == 2
    assert "quantmill init" in capsys.readouterr().err


def test_dry_run_refuses_too_little_disk_and_shows_the_need(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(root, _with("disk_reserve", "1000000TB"))
    assert main(["run", str(recipe), "--dry-run"]) == 2
    assert "needs about" in capsys.readouterr().err


def test_dry_run_plans_without_writing(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(root)
    before = tree_snapshot(root)
    assert main(["run", str(recipe), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [s["stage"] for s in plan["stages"]] == [
        "source", "calibrate", "gptq", "gguf-base", "imatrix", "gguf-Q4_K_M", "verify", "release"]
    assert all(s["status"] == "todo" and s["estimated_bytes"] > 0 for s in plan["stages"])
    assert plan["disk_needed_bytes"] == sum(s["estimated_bytes"] for s in plan["stages"])
    assert plan["estimated_seconds"] > 0
    assert tree_snapshot(root) == before
    assert main(["run", str(recipe), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "disk needed" in text and "gguf-Q4_K_M" in text


def test_keys_follow_inputs_and_parameters(root: Path) -> None:
    from quantmill.pipeline.plan import build_plan

    first = {n.name: n.key for n in build_plan(load_recipe(write_recipe(root))).nodes}
    again = {n.name: n.key for n in build_plan(load_recipe(write_recipe(root))).nodes}
    assert first == again
    changed = {n.name: n.key for n in build_plan(load_recipe(write_recipe(root, _with("gguf.types", ["Q4_K_M", "Q8_0"])))).nodes}
    assert {k for k in first if first[k] != changed.get(k)} == {"verify", "release"}  # new type: only downstream changes
    (root / "model" / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 2}', encoding="utf-8")
    edited = {n.name: n.key for n in build_plan(load_recipe(write_recipe(root))).nodes}
    assert all(first[k] != edited[k] for k in first)  # a changed source file changes every key


def test_each_node_is_keyed_by_its_records_typed_parameters(root: Path) -> None:
    """A node carries its kind's parameters model; its key is sha256 over (kind, version, params, dep keys)."""
    import dataclasses

    from quantmill.pipeline.plan import build_plan, stage_key
    from quantmill.pipeline.stages import STAGES

    loaded = load_recipe(write_recipe(root))
    plan = build_plan(loaded)
    for node in plan.nodes:
        assert type(node.params) is STAGES[node.kind].params and node.params.model_config["frozen"]
        assert node.key == stage_key(node.kind, node.params, [plan.node(d).key for d in node.deps])
    measured = plan.node("verify").params.artifacts  # type: ignore[attr-defined]
    assert sorted(measured) == sorted(loaded.recipe.artifact_names())
    assert measured["Q4_K_M"] == "gguf/tiny-Q4_K_M.gguf" and measured["gptq-4bit-32g-actorder_True"].startswith("gptq/")
    bumped = {**STAGES, "gptq": dataclasses.replace(STAGES["gptq"], version=2)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("quantmill.pipeline.plan.STAGES", bumped)
        again = {n.name: n.key for n in build_plan(loaded).nodes}
    assert {k for k, v in again.items() if v != plan.node(k).key} == {"gptq", "verify", "release"}  # a new version: it and downstream


@pytest.mark.parametrize("default", [False, True], ids=["example", "default"])
def test_init_writes_a_valid_recipe(tmp_path: Path, default: bool, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "release.yaml"
    assert main(["init", str(target), *(["--default"] if default else [])]) == 0
    loaded = load_recipe(target)
    assert loaded.recipe.source.kind == "bundled"
    assert loaded.recipe.gptq is not None and len(loaded.recipe.gptq.branches) == 2
    assert loaded.recipe.gguf is not None and loaded.recipe.gguf.types == ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M"]
    if not default:
        assert target.read_text(encoding="utf-8").count("\n#") > 10  # commented
    assert main(["init", str(target)]) == 2  # never overwrites silently
    assert "--force" in capsys.readouterr().err


def test_default_recipe_is_the_default_release() -> None:
    from quantmill.recipe_load import validate_recipe
    from quantmill.recipes import DEFAULT_RECIPE, bundled_recipe

    recipe = validate_recipe(yaml.safe_load(bundled_recipe(DEFAULT_RECIPE)), Path(DEFAULT_RECIPE))
    assert recipe.verify is not None and recipe.card.base_model
    assert sum(b.main for b in recipe.gptq.branches) == 1  # type: ignore[union-attr]


def test_sizes_parse() -> None:
    assert parse_size("2GB") == 2_000_000_000 and parse_size("500MiB") == 500 * 2**20 and parse_size(0) == 0
    with pytest.raises(ValueError):
        parse_size("-3GB")


def test_errors_are_recipe_errors(root: Path) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(write_recipe(root, _with("threads", 0)))
    assert info.value.exit_code == 2 and "threads 0" in str(info.value)


def test_default_release_is_the_bundled_recipe_with_its_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from quantmill.cli.default_release import default_recipe
    from quantmill.recipe_load import validate_recipe

    recipe = validate_recipe(default_recipe(tmp_path / "out", ("Q8_0",), 256, None, 1, 8), Path("x.yaml"))
    assert recipe.gguf.types == ["Q8_0"] and recipe.threads == 1  # type: ignore[union-attr]
    assert recipe.verify.n_ctx == 256 and recipe.verify.max_chunks == 8  # type: ignore[union-attr]
    assert len(recipe.gptq.branches) == 2  # type: ignore[union-attr]
    assert main(["default-release", "--out", str(tmp_path / "out"), "--type", "Q9_K"]) == 2
    assert "Q9_K" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_grid_mse_changes_the_gptq_key_and_the_branch_name(root: Path) -> None:
    from quantmill.pipeline.plan import build_plan

    first = {n.name: n.key for n in build_plan(load_recipe(write_recipe(root))).nodes}
    plan = build_plan(load_recipe(write_recipe(root, _with("gptq.branches.0.grid", "mse"))))
    changed = {n.name: n.key for n in plan.nodes}
    assert {k for k in first if first[k] != changed.get(k)} == {"gptq", "verify", "release"}
    assert "gptq-4bit-32g-actorder_True-mse" in plan.node("verify").params.artifacts  # type: ignore[attr-defined]
