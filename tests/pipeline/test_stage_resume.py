"""`quantmill run` killed (SIGKILL) inside its imatrix stage and then inside its GPTQ stage, after a middle
decoder layer of a 4-layer model: each re-run resumes the stage at that layer (its log says so), and the
release's bytes equal those of a run that was never killed."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from release_helpers import cli, make_tiny_model, output_hashes, write_recipe

pytestmark = pytest.mark.slow

# `quantmill run` in a child that SIGKILLs itself right after the pass named argv[2] checkpointed layer argv[3] - 1
KILLED_RUN = r"""
import os, signal, sys
from quantmill.quantize import resume
real_save = resume.LayerCheckpoint.save
def save(self, next_layer, arrays, state):
    real_save(self, next_layer, arrays, state)
    if self.fingerprint["pass"] == sys.argv[2] and next_layer == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
resume.LayerCheckpoint.save = save
from quantmill.cli import main
sys.exit(main(["run", sys.argv[1]]))
"""


def test_a_release_killed_inside_its_layer_by_layer_stages_resumes_them_at_their_layer(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "model", n_layer=4)
    (tmp_path / "clean").mkdir()
    (tmp_path / "killed").mkdir()
    clean = write_recipe(tmp_path / "clean", source={"kind": "local", "path": str(model)})
    cli("run", str(clean), cwd=clean.parent, check=True)
    recipe = write_recipe(tmp_path / "killed", source={"kind": "local", "path": str(model)})
    work = recipe.parent / "work"
    lines = []
    for pass_name, layer in (("gptq", 2), ("statistics", 2)):  # the plan's order: gptq, then imatrix
        killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(recipe), pass_name, str(layer)], cwd=recipe.parent,
                                capture_output=True, text=True, timeout=900, check=False)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        held = sorted(p.name for p in (work / "stages" / ".checkpoints").iterdir())
        assert len(held) == 1 and held[0].startswith("imatrix-" if pass_name == "statistics" else "gptq-"), held
        lines.append(killed.stderr)
    # the second killed run resumed the gptq stage before it was killed in the imatrix stage
    assert "gptq: resumed at layer 2 of 4" in (work / "quantmill.log").read_text(encoding="utf-8")
    result = cli("run", str(recipe), "--json", cwd=recipe.parent, check=True)
    assert "statistics: resumed at layer 2 of 4" in (work / "quantmill.log").read_text(encoding="utf-8")
    assert json.loads(result.stdout)["verification_passed"] is True
    assert output_hashes(work / "release") == output_hashes(clean.parent / "work" / "release")
    assert not (work / "stages" / ".checkpoints").exists()
    # stderr is not a terminal here: the stages and layers reported themselves by plain lines
    assert "quantmill: stage" in lines[0] and "quantmill: gptq (2 branches): layer 1/4" in lines[0]
    assert "quantmill: gptq (2 branches): layer 3/4" in lines[1] and "quantmill: statistics: layer 1/4" in lines[1]


def test_a_stage_per_gptq_branch_writes_the_same_branches(tmp_path: Path) -> None:
    """gptq.branches_per_stage: 1 gives one stage per branch (what a Ray cluster runs side by side) and the same bytes."""
    model = make_tiny_model(tmp_path / "model")
    hashes = {}
    for per_stage in (None, 1):
        root = tmp_path / f"per-stage-{per_stage}"
        root.mkdir()
        gptq = {"branches": [{"bits": 4, "group_size": 32, "main": True}, {"bits": 8, "group_size": -1}],
                "branches_per_stage": per_stage}
        recipe = write_recipe(root, source={"kind": "local", "path": str(model)}, gptq=gptq)
        report = json.loads(cli("run", str(recipe), "--json", cwd=root, check=True).stdout)
        gptq_stages = [s["stage"] for s in report["stages"] if s["kind"] == "gptq"]
        assert gptq_stages == (["gptq"] if per_stage is None else ["gptq-1", "gptq-2"])
        hashes[per_stage] = {k: v for k, v in output_hashes(root / "work" / "release").items()
                             if k.startswith(("gptq/", "gguf/")) and not k.endswith("README.md")}
    assert len(hashes[None]) > 10 and hashes[1] == hashes[None]
