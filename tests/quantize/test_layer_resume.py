"""Layer-level resume: a GPTQ or statistics pass killed (SIGKILL) after a middle layer resumes at that layer.

Each killed run is a child process that really kills itself with SIGKILL at a chosen point (right after
the checkpoint of a layer, or half-way through the next layer after some packed tensors were spooled);
the re-run continues from the checkpoint and must write the same bytes as an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from quantmill.calib_data.loaders import CalibrationText
from quantmill.calib_data.sampling import CalibrationSet, load_tokenize, sample_sequences, save_calibration_set
from quantmill.quantize.resume import LayerCheckpoint

TEXT = (Path(__file__).resolve().parents[2] / "calib_data" / "corpora" / "calib_as_you_like_it.txt").read_text(encoding="utf-8")
BRANCHES = ["4bit-32g-actorder", "8bit-none"]

# The child: optionally SIGKILLs itself after the checkpoint of layer ``kill_after - 1`` (or, with ``mid_layer``,
# at the second GPTQ solve after that checkpoint), then runs one pass.
CHILD = r"""
import json, logging, os, signal, sys
from pathlib import Path
args = json.loads(sys.argv[1])
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
from quantmill.calib_data.sampling import load_calibration_set
from quantmill.quantize import resume
from quantmill.quantize.gptq import engine

kill = args.get("kill_after")
armed = []
real_save = resume.LayerCheckpoint.save
def save(self, next_layer, arrays, state):
    real_save(self, next_layer, arrays, state)
    if next_layer == kill:
        if not args.get("mid_layer"):
            os.kill(os.getpid(), signal.SIGKILL)
        armed.append(True)
resume.LayerCheckpoint.save = save
real_solve = engine.gptq_quantize
def solve(*a, **k):
    if armed:
        armed.append(True)
        if len(armed) == 3:  # the second solve of the layer after the checkpoint: the first one's tensors are spooled
            os.kill(os.getpid(), signal.SIGKILL)
    return real_solve(*a, **k)
engine.gptq_quantize = solve

calib = load_calibration_set(Path(args["calibration"]))
checkpoints = Path(args["checkpoints"]) if args.get("checkpoints") else None
if args["pass"] == "gptq":
    from quantmill.quantize.gptq.branches import parse_branches
    engine.quantize_branches(Path(args["model"]), calib, parse_branches(args["branches"]), Path(args["out"]),
                             engine.EngineOptions(progress=False, checkpoint_dir=checkpoints))
else:
    from quantmill.quantize.gguf.imatrix import imatrix_from_stats, write_imatrix
    from quantmill.quantize.stats import collect_importance
    stats = collect_importance(Path(args["model"]), calib, progress=False, checkpoint_dir=checkpoints)
    write_imatrix(imatrix_from_stats(stats, calib), Path(args["out"]))
"""


def run_child(**args: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True,
                          timeout=600, check=False)


def hashes(path: Path) -> dict[str, str]:
    """sha256 of a file, or of a directory's files (without the temporaries a killed run left: ``.*.part``)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()
                                                 and not any(part.endswith(".part") for part in p.relative_to(path).parts))
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture
def model(make_tiny_llama) -> Path:
    return make_tiny_llama("bpe", name="tiny5", dtype="float16", num_hidden_layers=5, tie_word_embeddings=False)


@pytest.fixture
def calibration(model: Path, tmp_path: Path) -> Path:
    calib = sample_sequences(CalibrationText("ayli", (TEXT,)), load_tokenize(model), samples=6, seqlen=48, seed=3)
    save_calibration_set(calib, tmp_path / "calibration")
    return tmp_path / "calibration"


def kill_then_resume(tmp_path: Path, **args: Any) -> tuple[dict[str, str], subprocess.CompletedProcess[str]]:
    """An uninterrupted run's hashes, after a killed run and its resumption (whose result is returned)."""
    out, checkpoints = tmp_path / "resumed", tmp_path / "checkpoints"
    killed = run_child(out=str(out), checkpoints=str(checkpoints), **args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (checkpoints / "state.json").is_file() and not [p for p in out.iterdir() if not p.name.endswith(".part")]
    resumed = run_child(out=str(out), checkpoints=str(checkpoints), **{k: v for k, v in args.items() if k != "kill_after"})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return hashes(out), resumed


@pytest.mark.parametrize("mid_layer", [False, True], ids=["after-checkpoint", "mid-layer"])
def test_killed_gptq_pass_resumes_at_its_layer_with_identical_branches(
        model: Path, calibration: Path, tmp_path: Path, mid_layer: bool) -> None:
    common = {"pass": "gptq", "model": str(model), "calibration": str(calibration), "branches": BRANCHES}
    clean = run_child(out=str(tmp_path / "clean"), **common)
    assert clean.returncode == 0, clean.stderr[-2000:]
    resumed_hashes, resumed = kill_then_resume(tmp_path, kill_after=3, mid_layer=mid_layer, **common)
    assert "gptq: resumed at layer 3 of 5" in resumed.stderr
    want = {k.replace("clean/", "resumed/", 1): v for k, v in hashes(tmp_path / "clean").items()}
    assert len(want) > 10 and resumed_hashes == want


def test_killed_statistics_pass_resumes_at_its_layer_with_an_identical_imatrix(
        model: Path, calibration: Path, tmp_path: Path) -> None:
    common = {"pass": "statistics", "model": str(model), "calibration": str(calibration)}
    clean = run_child(out=str(tmp_path / "clean.gguf"), **common)
    assert clean.returncode == 0, clean.stderr[-2000:]
    out, checkpoints = tmp_path / "resumed.gguf", tmp_path / "checkpoints"
    killed = run_child(out=str(out), checkpoints=str(checkpoints), kill_after=2, **common)
    assert killed.returncode == -signal.SIGKILL and not out.exists()
    resumed = run_child(out=str(out), checkpoints=str(checkpoints), **common)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "statistics: resumed at layer 2 of 5" in resumed.stderr
    assert out.read_bytes() == (tmp_path / "clean.gguf").read_bytes()


def test_killed_lckv_gptq_pass_keeps_the_kv_of_layers_done(smollm2_tokenizer_dir: Path, tmp_path: Path) -> None:
    """Layer 3 attends to layer 2's keys and values, computed by the killed run: they travel in the checkpoint."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lckv_helpers import build_tiny_lckv

    from quantmill.calib_data.sampling import load_tokenize as tokenize_of

    model = build_tiny_lckv(tmp_path / "lckv", smollm2_tokenizer_dir, "0_0_2_2", vocab_size=49152)
    calib = sample_sequences(CalibrationText("ayli", (TEXT,)), tokenize_of(model), samples=4, seqlen=32, seed=3)
    save_calibration_set(calib, tmp_path / "calibration")
    common = {"pass": "gptq", "model": str(model), "calibration": str(tmp_path / "calibration"), "branches": ["4bit-32g"]}
    clean = run_child(out=str(tmp_path / "clean"), **common)
    assert clean.returncode == 0, clean.stderr[-2000:]
    resumed_hashes, resumed = kill_then_resume(tmp_path, kill_after=3, **common)
    assert "gptq: resumed at layer 3 of 4" in resumed.stderr
    assert resumed_hashes == {k.replace("clean/", "resumed/", 1): v for k, v in hashes(tmp_path / "clean").items()}


def test_a_checkpoint_is_whole_or_absent_and_tied_to_its_inputs(tmp_path: Path) -> None:
    checkpoint = LayerCheckpoint(tmp_path / "c", {"pass": "test", "n": 1})
    assert checkpoint.load() is None
    first = np.arange(12, dtype=np.float32).reshape(3, 4)
    checkpoint.save(1, {"a": first}, {"note": "one"})
    checkpoint.save(2, {"a": first * 2, "b": np.ones(3)}, {"note": "two"})
    saved = checkpoint.load()
    assert saved is not None and saved.next_layer == 2 and saved.state == {"note": "two"}
    assert np.array_equal(saved.arrays["a"], first * 2) and saved.arrays["a"].dtype == np.float32
    assert len(list((tmp_path / "c").glob("*.npy"))) == 2  # the first layer's arrays are gone
    # arrays written but never committed (a kill before state.json) leave the last commit in force
    (tmp_path / "c" / "layer00003-0000.npy").write_bytes(b"half")
    assert LayerCheckpoint(tmp_path / "c", {"pass": "test", "n": 1}).load().next_layer == 2  # type: ignore[union-attr]
    # a checkpoint made for other inputs is discarded, not resumed
    assert LayerCheckpoint(tmp_path / "c", {"pass": "test", "n": 2}).load() is None
    assert not (tmp_path / "c").exists()
    assert LayerCheckpoint(None, {}).load() is None


def test_a_checkpoint_of_other_inputs_is_not_resumed(model: Path, tmp_path: Path) -> None:
    from quantmill.quantize.stats import collect_importance

    tokenize = load_tokenize(model)
    sets: list[CalibrationSet] = [sample_sequences(CalibrationText("ayli", (TEXT,)), tokenize, samples=2, seqlen=16, seed=s)
                                  for s in (1, 2)]
    save_calibration_set(sets[0], tmp_path / "first")
    checkpoints = tmp_path / "checkpoints"
    killed = run_child(**{"pass": "statistics"}, model=str(model), calibration=str(tmp_path / "first"),
                       out=str(tmp_path / "first.gguf"), checkpoints=str(checkpoints), kill_after=2)
    assert killed.returncode == -signal.SIGKILL
    assert json.loads((checkpoints / "state.json").read_text())["fingerprint"]["calibration"]["seed"] == 1
    second = collect_importance(model, sets[1], progress=False, checkpoint_dir=checkpoints)  # must not resume the first
    plain = collect_importance(model, sets[1], progress=False)
    assert all(np.array_equal(second.sum_squares[k], plain.sum_squares[k]) for k in plain.sum_squares)
    assert not checkpoints.exists()  # a finished pass removes its checkpoints


def test_a_checkpoint_dir_holding_the_users_files_is_refused_and_left_alone(model: Path, tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from quantmill.cli import main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me\n", encoding="utf-8")
    for argv in (["quantize", "gptq", str(model), "--out", str(tmp_path / "out"), "--branch", "4bit-32g"],
                 ["calibrate", str(model), "--out", str(tmp_path / "im.gguf")]):
        assert main([*argv, "--calib-samples", "2", "--calib-seqlen", "16", "--checkpoint-dir", str(mine)]) == 2
        err = capsys.readouterr().err
        assert "--checkpoint-dir" in err and "notes.txt" in err and err.count("\n") == 1
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me\n"
    assert not (tmp_path / "out").exists() and not (tmp_path / "im.gguf").exists()
