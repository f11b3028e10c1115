"""The architecture registry: one record per family, registered by plain import; duplicates raise;
a recipe whose model cannot go through one of its stages is refused before any work."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from quantmill.cli import main
from quantmill.convert.arch import families, for_config, register
from quantmill.convert.arch.base import CAPABILITIES, Architecture

ROOT = Path(__file__).resolve().parents[2]


def test_records_claim_known_capabilities_and_have_what_they_claim() -> None:
    for arch in families():
        assert arch.stages <= set(CAPABILITIES), arch.name
        if arch.supports("statistics") or arch.supports("gptq"):
            assert arch.decoder is not None and arch.decoder.linear_groups, arch.name
        if arch.supports("gguf-to-hf"):
            assert arch.gguf_to_hf is not None, arch.name
        for model_type in arch.model_types:
            assert for_config({"model_type": model_type}, Path("config.json")) is arch


@pytest.mark.parametrize("clash", ["family", "model_type", "architecture"])
def test_a_duplicate_registration_raises(clash: str) -> None:
    names = {"family": ("llama", ("NewForCausalLM",), ("new",)),
             "model_type": ("new-family", ("NewForCausalLM",), ("mistral",)),
             "architecture": ("new-family", ("FalconForCausalLM",), ("new",))}[clash]
    family, hf_names, model_types = names

    with pytest.raises(ValueError, match="registered twice"):
        @register(*hf_names, model_types=model_types)
        class Clash(Architecture):  # noqa: F841 - registration is the point
            name = family
    assert {a.name for a in families()} >= {"llama", "falcon", "lckv-llama", "qwen2", "qwen3"}


def test_unknown_capability_is_a_definition_error() -> None:
    with pytest.raises(TypeError, match="unknown capabilities"):
        class Bad(Architecture):  # noqa: F841
            name = "bad"
            stages = frozenset({"teleport"})


def test_no_per_stage_architecture_tables_or_import_strings_remain() -> None:
    """What one family is lives in its record: the old tables and import_module registries are gone."""
    old = re.compile(r"\b(ARCHITECTURES|PRE_NORM_LAYOUTS|MODEL_FLOWS|ARCH_MODULES|DecoderArch|GGUFArchitecture)\b")
    offenders = []
    for folder in ("convert", "quantize", "verify", "quantmill", "calib_data"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            if old.search(text) or (folder in ("convert", "quantize") and "import_module" in text):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders


def _recipe(tmp_path: Path, source: Path, **sections: object) -> Path:
    recipe = {"name": "r", "source": {"kind": "local", "path": str(source)}, "work_dir": str(tmp_path / "work"),
              "calibration": {"samples": 2, "seqlen": 32}, "verify": {"max_chunks": 2, "n_ctx": 64}, **sections}
    path = tmp_path / "release.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


@pytest.mark.parametrize("sections, stage", [
    ({"gguf": {"base": "f16", "types": ["Q4_K_M"], "imatrix": False}}, "gguf-Q4_K_M"),
    ({"gguf": {"base": "f16", "types": []}, "gptq": {"branches": [{"bits": 4}]}}, "verify"),
    ({"gguf": {"base": "f16", "types": ["Q4_K_M"], "imatrix": True}}, "imatrix"),
])
def test_dry_run_refuses_a_stage_the_family_cannot_run(sections: dict, stage: str, family_model, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    model = family_model("lckv-w2")
    recipe = _recipe(tmp_path, model, **sections)
    capsys.readouterr()
    assert main(["run", str(recipe), "--dry-run"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "lckv-llama" in lines[0] and f"stage {stage!r}" in lines[0], lines
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").rglob("*.safetensors"))


def test_dry_run_accepts_falcon_gptq_and_kquants(family_model, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = family_model("falcon-40b")
    recipe = _recipe(tmp_path, model, gptq={"branches": [{"bits": 4, "group_size": 32}]},
                     gguf={"base": "f16", "types": ["Q4_K_M"], "imatrix": True})
    capsys.readouterr()
    assert main(["run", str(recipe), "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dry_run"] is True
