"""A recipe's ``gguf.mixes``: a budgeted mix made, verified, carded and recorded like every other artifact."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from release_helpers import TINY_RECIPE, make_tiny_model, output_hashes, run_and_check_release, write_recipe

from quantmill.errors import UserInputError


def _mix_recipe(root: Path, model: Path, mixes: list[dict[str, object]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    data = {**TINY_RECIPE, "source": {"kind": "local", "path": str(model)}}
    data.pop("gptq")
    data["gguf"] = {**data["gguf"], "mixes": mixes}  # type: ignore[dict-item]
    return write_recipe(root, data)


@pytest.mark.slow
def test_a_recipe_mix_is_made_verified_carded_recorded_and_reproducible(tmp_path: Path) -> None:
    from quantmill.quantize.gguf.inspect import summarize_gguf

    model = make_tiny_model(tmp_path / "model")
    recipe = _mix_recipe(tmp_path / "run", model, [{"name": "QM-5.5", "target_bpw": 5.5}])
    report, manifest = run_and_check_release(recipe, passed=None)
    release = Path(report["work_dir"]) / "release"
    mix_file = release / "gguf" / "tiny-QM-5.5.gguf"
    summary = summarize_gguf(mix_file)
    assert summary.bpw <= 5.5
    record = manifest["mixes"]["QM-5.5"]
    assert record["refined"] is True and record["target"] == "5.5 bpw"
    assert record["types"] == {k: v for k, v in summary.tensor_types().items() if k in record["types"]}
    assert record["method"]["gain_tokens"] == [2, 64]  # the calibration set's first 2 sequences (of 64 tokens here)
    measured = {a["name"] for a in manifest["verification"]["artifacts"]}
    assert {"QM-5.5", "Q4_K_M"} <= measured
    card = (release / "gguf" / "README.md").read_text(encoding="utf-8")
    row = next(line for line in card.splitlines() if "tiny-QM-5.5.gguf" in line and line.startswith("| ["))
    assert "| QM-5.5 |" in row and "quantmill mix for 5.5 bpw" in row and "KLD each tensor causes alone" in row
    assert f"predicted mean KLD {record['predicted_kld']:.6g}" in row
    assert json.loads((release / "verify" / "verify.json").read_text(encoding="utf-8"))
    # the same recipe in another directory: the same bytes, the mix's file and the manifest's record included
    again, _ = run_and_check_release(_mix_recipe(tmp_path / "again", model, [{"name": "QM-5.5", "target_bpw": 5.5}]),
                                     passed=None)
    assert output_hashes(Path(again["work_dir"]) / "release") == output_hashes(release)


@pytest.mark.parametrize("mixes, message", [
    ([{"name": "QM", "target_bpw": 5.0, "target_size": "10MB"}], "exactly one of target_bpw"),
    ([{"name": "QM"}], "exactly one of target_bpw"),
    ([{"name": "Q4_K_M", "target_bpw": 5.0}], "already a type or mix"),
    ([{"name": "a/b", "target_bpw": 5.0}], "gguf.mixes.0.name"),
    ([{"name": "QM", "target_size": "lots"}], "is not a size"),
    ([{"name": "QM", "target_bpw": 2.0}], "must be above 2.625"),
])
def test_bad_mixes_are_refused_by_the_recipe(tmp_path: Path, mixes: list[dict[str, object]], message: str) -> None:
    from quantmill.recipe_load import load_recipe

    recipe = _mix_recipe(tmp_path, tmp_path / "model", mixes)
    with pytest.raises(UserInputError, match=message):
        load_recipe(recipe)


def test_a_refined_mix_of_a_family_without_measured_gains_is_refused_before_any_work(
        tmp_path: Path, smollm2_tokenizer_dir: Path) -> None:
    """Falcon has no GGUF -> HF name map: its mixes need ``refine: false``, which the plan says before any stage runs."""
    from families import falcon

    from quantmill.errors import UnsupportedError
    from quantmill.pipeline.capabilities import check_capabilities
    from quantmill.pipeline.plan import build_plan
    from quantmill.recipe_load import load_recipe

    model = falcon(tmp_path / "falcon", smollm2_tokenizer_dir, "float32")
    refined = build_plan(load_recipe(_mix_recipe(tmp_path / "a", model, [{"name": "QM", "target_bpw": 5.0}])))
    with pytest.raises(UnsupportedError, match="gguf-mix-gains.*stage 'gguf-QM'"):
        check_capabilities(refined)
    plain = build_plan(load_recipe(_mix_recipe(tmp_path / "b", model, [{"name": "QM", "target_bpw": 5.0, "refine": False}])))
    assert check_capabilities(plain) is not None
    assert not (tmp_path / "a" / "work").exists()
