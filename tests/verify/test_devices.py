"""Devices on a CPU-only machine: names checked, ``auto`` resolved, CUDA refused before any work with what to do,
and the CPU↔GPU parity record judged (on two real CPU measurements, one relabelled as the second device)."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from release_helpers import make_tiny_model, write_recipe
from verify_helpers import N_CTX, OPTIONS, model_pair, write_eval_text

from quantmill.cli import main
from quantmill.device import resolve_device, resolve_devices
from quantmill.errors import UserInputError
from quantmill.pipeline.stages.gptq import GptqParams
from quantmill.recipe import Recipe
from quantmill.verify.evaluate import VerifyResult, verify_on_devices
from quantmill.verify.parity import MAX_PPL_DIFF_PCT, device_parity
from quantmill.verify.report import parity_table, report_dict, report_passed

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device: nothing to refuse")


def test_device_names_and_auto() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_devices(["cpu", "auto", "cpu"]) == (("cpu", "cuda") if torch.cuda.is_available() else ("cpu",))
    with pytest.raises(UserInputError, match=r"--device gpu: not a device; use cpu, cuda, cuda:N or auto"):
        resolve_device("gpu")


@no_cuda
def test_cuda_without_a_gpu_is_refused_with_what_to_do() -> None:
    with pytest.raises(UserInputError, match=r"--device cuda: torch .* sees no CUDA device\(s\) here; use --device cpu"):
        resolve_device("cuda")


@no_cuda
@pytest.mark.parametrize("command", ["quantize-gptq", "calibrate", "verify"])
def test_cli_refuses_cuda_before_any_work(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_tiny_model(tmp_path / "model")
    out = tmp_path / "out"
    args = {"quantize-gptq": ["quantize", "gptq", str(model), "--out", str(out), "--branch", "4bit-32g", "--device", "cuda"],
            "calibrate": ["calibrate", str(model), "--out", str(out / "imatrix.gguf"), "--device", "cuda"],
            "verify": ["verify", str(model), "--reference", str(model), "--text", str(model / "config.json"),
                       "--json", str(out / "v.json"), "--devices", "cpu,cuda"]}[command]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cuda: torch" in err[0] and "use --device cpu" in err[0], err
    assert not out.exists()


@no_cuda
def test_a_recipe_on_cuda_is_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_tiny_model(tmp_path / "model")
    recipe = write_recipe(tmp_path, resources={"device": "cuda"}, gguf=None)
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "resources.device cuda: torch" in err and "Traceback" not in err
    assert not (tmp_path / "work" / "stages").exists()


def test_a_cpu_stage_keeps_its_key_a_cuda_stage_gets_another() -> None:
    base = dict(model="source", calibration="calibrate", branches=(), threads=2)
    assert "device" not in GptqParams(**base).model_dump(mode="json")
    assert GptqParams(**base, device="cuda").model_dump(mode="json")["device"] == "cuda"
    # the manifest's recipe, likewise: as before devices on the CPU, recorded where it is another
    assert "device" not in Recipe(gguf={"types": ["Q8_0"]}).model_dump(mode="json")["resources"]
    assert Recipe(gguf={"types": ["Q8_0"]}, resources={"device": "cuda"}).model_dump(mode="json")["resources"]["device"] == "cuda"


def _relabelled(result: VerifyResult, device: str, ppl_factor: float = 1.0, kld: float | None = None) -> VerifyResult:
    """``result`` as if measured on ``device``: every perplexity scaled, every artifact's mean KLD replaced."""
    def change(artifact):  # type: ignore[no-untyped-def]
        metrics = {**artifact.metrics, "ppl": artifact.ppl * ppl_factor}
        if kld is not None and not artifact.is_reference:
            metrics["kld_mean"] = kld
        return dataclasses.replace(artifact, metrics=metrics)
    return dataclasses.replace(result, device=device, results=tuple(map(change, result.results)))


def test_parity_record_verdicts(tmp_path: Path) -> None:
    gguf_path, reference = model_pair(tmp_path, add_bos=False)
    eval_txt = write_eval_text(tmp_path / "eval")
    cpu, again = verify_on_devices([gguf_path], reference, eval_txt, N_CTX, OPTIONS, ["cpu", "cpu"], max_chunks=4)
    assert [a.metrics for a in cpu.results] == [a.metrics for a in again.results]  # the same device, the same figures
    kld = cpu.artifacts[0].metrics["kld_mean"]
    same = report_dict((cpu, _relabelled(again, "cuda")))
    parity = same["device_parity"]
    assert parity["devices"] == ["cpu", "cuda"] and parity["passed"] and report_passed(same)
    assert [row["verdict"] for row in parity["artifacts"]] == ["pass", "pass"]
    assert parity["artifacts"][1]["ppl_diff_pct"]["cuda"] == 0.0 and parity["artifacts"][1]["kld_mean"]["cpu"] == kld
    table = parity_table(same)
    assert "| artifact | ppl cpu | ppl cuda | Δppl % cuda | mean KLD cpu | mean KLD cuda | ΔKLD % cuda | verdict |" in table
    # perplexity off by more than the limit: both rows fail, the reason names the devices and the limit
    off = report_dict((cpu, _relabelled(again, "cuda", ppl_factor=1 + 1.5 * MAX_PPL_DIFF_PCT / 100)))
    assert not report_passed(off) and off["passed"]  # the thresholds still hold; the devices disagree
    assert all(r["verdict"] == "FAIL" for r in off["device_parity"]["artifacts"])
    assert "cuda perplexity" in off["device_parity"]["artifacts"][0]["failures"][0] and "limit ±0.2 %" in parity_table(off)
    # KLD: 10 % off fails where it is above the noise floor, passes below it
    big = device_parity((_relabelled(cpu, "cpu", kld=1e-2), _relabelled(again, "cuda", kld=1.1e-2)), lambda p, r: p.name)
    small = device_parity((_relabelled(cpu, "cpu", kld=1e-5), _relabelled(again, "cuda", kld=2e-5)), lambda p, r: p.name)
    assert big["artifacts"][1]["verdict"] == "FAIL" and math.isclose(big["artifacts"][1]["kld_diff_pct"]["cuda"], 10.0)
    assert small["artifacts"][1]["verdict"] == "pass"
    json.dumps(same, allow_nan=False)  # the record is plain JSON
