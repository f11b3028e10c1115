"""A memory budget: GPTQ's activation streams spill to disk when they would not fit, with the same output bytes.

The slow test measures it: a model whose branches' activation streams (2 x 268 MB, plus the attention
outputs' 268 MB) are larger than the budget, quantized in child processes with and without the budget;
each child reports its own peak RSS (``VmHWM``).
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from quantmill.calib_data.sampling import CalibrationSet, save_calibration_set, token_sha256
from quantmill.cli import main
from quantmill.errors import UserInputError
from quantmill.quantize.cost import PassShape, gptq_peak
from quantmill.quantize.gptq.branches import parse_branches
from quantmill.quantize.gptq.engine import EngineOptions, quantize_branches

CHILD = r"""
import json, logging, sys
from pathlib import Path
args = json.loads(sys.argv[1])
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
from quantmill.calib_data.sampling import load_calibration_set
from quantmill.quantize.gptq.branches import parse_branches
from quantmill.quantize.gptq.engine import EngineOptions, quantize_branches
quantize_branches(Path(args["model"]), load_calibration_set(Path(args["calibration"])), parse_branches(args["branches"]),
                  Path(args["out"]), EngineOptions(progress=False, max_memory=args["max_memory"]))
# this process's own peak RSS: VmHWM (ru_maxrss of a forked child starts at its parent's RSS, here the pytest process)
print(json.dumps({"peak_rss": int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) * 1024}))
"""


def random_calibration(vocab: int, samples: int, seqlen: int, seed: int = 5) -> CalibrationSet:
    ids = np.random.default_rng(seed).integers(0, vocab, size=(samples, seqlen), dtype=np.int32)
    return CalibrationSet(ids, "random", seed, token_sha256(ids), ids.size)


def hashes(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _shape(model: Path, calib: CalibrationSet, batch_tokens: int) -> tuple[int, int]:
    """(predicted peak in memory, predicted peak spilled) for two branches."""
    from transformers import AutoConfig

    from quantmill.convert.safetensors_io import Checkpoint
    from quantmill.quantize.cost import layer_params
    from quantmill.quantize.layerwise import KEEP_BYTES

    with Checkpoint(model) as ckpt:
        params = layer_params(ckpt.entries, "model.layers.0.")
    shape = PassShape.of(AutoConfig.from_pretrained(model), params, calib.samples, calib.seqlen, batch_tokens)
    return gptq_peak(shape, 2, False, KEEP_BYTES), gptq_peak(shape, 2, True, 0)


def test_a_budget_below_the_streams_spills_them_and_writes_the_same_bytes(make_tiny_llama, tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    model = make_tiny_llama("bpe", name="tiny3", dtype="float16", num_hidden_layers=3)
    calib = random_calibration(49152, samples=12, seqlen=32)
    branches = parse_branches(["4bit-32g-actorder", "8bit-none"])
    plain, spilled = _shape(model, calib, batch_tokens=64)
    assert spilled < plain
    quantize_branches(model, calib, branches, tmp_path / "plain", EngineOptions(progress=False, batch_tokens=64))
    with caplog.at_level("INFO", logger="quantmill"):
        quantize_branches(model, calib, branches, tmp_path / "budget", EngineOptions(
            progress=False, batch_tokens=64, max_memory=(plain + spilled) // 2, checkpoint_dir=tmp_path / "checkpoints"))
    assert "activation streams spilled to disk" in caplog.text
    assert hashes(tmp_path / "budget") == hashes(tmp_path / "plain") and len(hashes(tmp_path / "plain")) > 10
    assert not (tmp_path / "checkpoints").exists()


def test_a_budget_nothing_fits_is_refused_before_any_work(make_tiny_llama, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    model = make_tiny_llama("bpe", name="tiny3", dtype="float16", num_hidden_layers=3)
    calib = random_calibration(49152, samples=4, seqlen=32)
    with pytest.raises(UserInputError, match=r"memory budget 100\.0 MB: gptq of .* needs about .* even with its "
                                             r"activation streams on disk"):
        quantize_branches(model, calib, parse_branches(["4bit-32g"]), tmp_path / "out",
                          EngineOptions(progress=False, max_memory=100 * 10**6))
    assert not (tmp_path / "out").exists()
    assert main(["quantize", "gptq", str(model), "--out", str(tmp_path / "cli"), "--branch", "4bit-32g",
                 "--calib-samples", "4", "--calib-seqlen", "32", "--max-memory", "100MB"]) == 2
    err = capsys.readouterr().err
    assert "memory budget 100.0 MB" in err and "Traceback" not in err and not (tmp_path / "cli").exists()
    assert main(["quantize", "gptq", str(model), "--out", str(tmp_path / "cli"), "--branch", "4bit-32g",
                 "--max-memory", "lots"]) == 2
    assert "'lots' is not a size" in capsys.readouterr().err


def _child(**args: Any) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, timeout=1200,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "log": done.stderr}


@pytest.mark.slow
def test_peak_rss_stays_under_a_budget_smaller_than_the_activation_streams(make_tiny_llama, tmp_path: Path) -> None:
    model = make_tiny_llama("bpe", name="wide", dtype="float16", num_hidden_layers=2, hidden_size=256,
                            intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    calib = random_calibration(49152, samples=512, seqlen=512)
    save_calibration_set(calib, tmp_path / "calibration")
    stream = calib.samples * calib.seqlen * 256 * 4
    budget = 700 * 10**6
    assert 3 * stream > budget  # two branches' streams and the attention outputs
    common = {"model": str(model), "calibration": str(tmp_path / "calibration"), "branches": ["4bit-32g-actorder", "8bit-none"]}
    plain = _child(out=str(tmp_path / "plain"), max_memory=None, **common)
    budgeted = _child(out=str(tmp_path / "budget"), max_memory=budget, **common)
    print(json.dumps({"stream_bytes": stream, "budget": budget, "plain_peak_rss": plain["peak_rss"],
                      "budgeted_peak_rss": budgeted["peak_rss"]}))
    assert "activation streams spilled to disk" in budgeted["log"]
    assert budgeted["peak_rss"] < budget < plain["peak_rss"]
    assert hashes(tmp_path / "budget") == hashes(tmp_path / "plain")


def test_the_statistics_pass_spills_under_a_budget_with_the_same_sums(make_tiny_llama, caplog: pytest.LogCaptureFixture) -> None:
    from quantmill.quantize.cost import statistics_peak
    from quantmill.quantize.stats import collect_importance

    model = make_tiny_llama("bpe", name="tiny3", dtype="float16", num_hidden_layers=3)
    calib = random_calibration(49152, samples=300, seqlen=16)  # more sequences than one batch (256) holds
    from transformers import AutoConfig

    from quantmill.convert.safetensors_io import Checkpoint
    from quantmill.quantize.cost import layer_params

    with Checkpoint(model) as ckpt:
        params = layer_params(ckpt.entries, "model.layers.0.")
    shape = PassShape.of(AutoConfig.from_pretrained(model), params, calib.samples, calib.seqlen, 4096)
    plain_peak, spilled_peak = statistics_peak(shape, False), statistics_peak(shape, True)
    assert spilled_peak < plain_peak
    plain = collect_importance(model, calib, progress=False)
    with caplog.at_level("INFO", logger="quantmill"):
        budgeted = collect_importance(model, calib, progress=False, max_memory=(plain_peak + spilled_peak) // 2)
    assert "statistics: activation streams spilled to disk" in caplog.text
    assert plain.counts == budgeted.counts
    assert all(np.array_equal(plain.sum_squares[k], budgeted.sum_squares[k]) for k in plain.sum_squares)
