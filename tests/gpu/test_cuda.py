"""The same code on the GPU: GPTQ, the statistics pass and verify on CUDA against their CPU results.

Collected everywhere, run only where torch sees a CUDA device (``-m gpu``; benchmarks/gpu_check.sh runs them on a
lent machine). Tolerances: GPTQ on CUDA may put a weight one level apart where float reductions in another order
tip a rounding (at most GPTQ_LEVEL_FLIPS of the codes); verify's figures must agree within verify.parity's limits.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from verify_helpers import N_CTX, OPTIONS, model_pair, write_eval_text

from quantmill.calib_data.loaders import CalibrationText
from quantmill.calib_data.sampling import load_tokenize, sample_sequences
from quantmill.quantize.gptq.branches import parse_branches
from quantmill.quantize.gptq.dequant import dequantized_tensors
from quantmill.quantize.gptq.engine import EngineOptions, quantize_branches
from quantmill.quantize.stats import collect_importance
from quantmill.verify.evaluate import verify_on_devices
from quantmill.verify.report import report_dict

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no CUDA device visible to torch (run on a GPU machine: benchmarks/gpu_check.sh)")]
GPTQ_LEVEL_FLIPS = 0.01  # fraction of weights whose GPTQ code may differ between CPU and CUDA
TEXT = (Path(__file__).resolve().parents[2] / "calib_data" / "corpora" / "calib_as_you_like_it.txt").read_text(encoding="utf-8")


@pytest.fixture
def tiny(make_tiny_llama) -> Path:
    return make_tiny_llama("bpe", name="tiny-gpu", dtype="float16", num_hidden_layers=2)


def test_gptq_on_cuda_matches_the_cpu(tiny: Path, tmp_path: Path) -> None:
    calib = sample_sequences(CalibrationText("ayli", (TEXT,)), load_tokenize(tiny), samples=8, seqlen=64, seed=3)
    weights = {}
    for device in ("cpu", "cuda"):
        [branch] = quantize_branches(tiny, calib, parse_branches(["4bit-32g-actorder"]), tmp_path / device,
                                     EngineOptions(device=device, progress=False))
        weights[device] = dequantized_tensors(branch.directory)
    assert weights["cpu"].keys() == weights["cuda"].keys()
    for name, cpu in weights["cpu"].items():
        cuda = weights["cuda"][name]
        differ = float((cpu != cuda).float().mean())
        assert differ <= GPTQ_LEVEL_FLIPS, f"{name}: {differ:.4f} of the weights differ between CPU and CUDA"


def test_statistics_on_cuda_match_the_cpu(tiny: Path) -> None:
    calib = sample_sequences(CalibrationText("ayli", (TEXT,)), load_tokenize(tiny), samples=4, seqlen=64, seed=3)
    cpu, cuda = (collect_importance(tiny, calib, device=d, progress=False) for d in ("cpu", "cuda"))
    assert cpu.sum_squares.keys() == cuda.sum_squares.keys() and cpu.counts == cuda.counts
    for name, sums in cpu.sum_squares.items():
        np.testing.assert_allclose(cuda.sum_squares[name], sums, rtol=1e-4, atol=1e-6, err_msg=name)


def test_verify_cpu_and_cuda_agree(tmp_path: Path) -> None:
    gguf_path, reference = model_pair(tmp_path, add_bos=False)
    eval_txt = write_eval_text(tmp_path / "eval")
    from quantmill.llama_lib import binding

    artifacts = [gguf_path] if binding().llama_supports_gpu_offload() else []  # the CPU wheel: torch backends only
    results = verify_on_devices([*artifacts, reference], reference, eval_txt, N_CTX, OPTIONS, ["cpu", "cuda"], max_chunks=4)
    parity = report_dict(results)["device_parity"]
    assert parity["passed"], parity
