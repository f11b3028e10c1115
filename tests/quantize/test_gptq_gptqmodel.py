"""quantmill's GPTQ branches load in GPTQModel 7.6 (and transformers) and give quantmill's logits.

GPTQModel is not a dependency of quantmill; it lives in its own virtualenv, created (pinned,
idempotent) by ``scripts/gptqmodel_venv.sh`` under ``~/.cache/quantmill/gptqmodel-venv``.
``scripts/test.sh`` creates it and exports ``$QUANTMILL_GPTQMODEL_PYTHON``; when that variable
is set the test runs (and fails if the interpreter is missing). Without the variable the test
looks in the default place and is skipped, with that reason, when nothing is there.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from quantmill.calib_data.loaders import CalibrationText
from quantmill.calib_data.sampling import load_tokenize, sample_sequences
from quantmill.quantize.gptq.branches import parse_branches
from quantmill.quantize.gptq.dequant import load_dequantized_model
from quantmill.quantize.gptq.engine import EngineOptions, quantize_branches

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_GPTQMODEL_PYTHON = Path.home() / ".cache" / "quantmill" / "gptqmodel-venv" / "bin" / "python"
REQUIRED = "QUANTMILL_GPTQMODEL_PYTHON" in os.environ  # set by scripts/test.sh: the peer must be there
GPTQMODEL_PYTHON = Path(os.environ.get("QUANTMILL_GPTQMODEL_PYTHON", DEFAULT_GPTQMODEL_PYTHON))
TEXT = (ROOT / "calib_data" / "corpora" / "calib_as_you_like_it.txt").read_text(encoding="utf-8")

# Loads each branch with the loaders named after it (``PATH=gptqmodel,transformers``): GPTQModel's own
# loader or transformers' GPTQ loader, both with GPTQModel's torch kernel, in float16 (the only CPU dtypes
# that kernel accepts); then runs the same kernels in float32 (dequantize + matmul) and saves the logits.
WORKER = r"""
import json, sys
import numpy as np, torch
from gptqmodel import BACKEND, GPTQModel
from transformers import AutoModelForCausalLM, GPTQConfig
ids = torch.from_numpy(np.load(sys.argv[1]).astype(np.int64))
def load(path, loader):
    if loader == "gptqmodel":
        return GPTQModel.load(path, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model
    bits = json.load(open(path + "/quantize_config.json"))["bits"]
    return AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float16,
                                                quantization_config=GPTQConfig(bits=bits, backend="torch"))
out = {}
for arg in sys.argv[2:]:
    path, loaders = arg.split("=")
    out[path] = {}
    for loader in loaders.split(","):
        model = load(path, loader)
        quant = [m for m in model.modules() if hasattr(m, "qweight")]
        torch.nn.Module.float(model)
        for m in quant:
            for reset in ("clear_weight_cache", "_stream_reset_cache"):
                if hasattr(m, reset):
                    getattr(m, reset)()
        with torch.no_grad():
            np.save(f"{path}/{loader}_logits.npy", model(input_ids=ids).logits.float().numpy())
        out[path][loader] = len(quant)
print(json.dumps(out))
"""
# GPTQModel's own loader refuses every asymmetric v1 checkpoint not made by GPTQModel >= 0.9 (old AutoGPTQ
# wrote broken ones); transformers' loader reads them.
# mse-grid branches (issue 15) carry extra quantization_config keys (mse, grid, grid_shrink_range, grid_steps).
LOADERS = {"4bit-32g-actorder": "gptqmodel,transformers", "3bit-32g": "gptqmodel", "8bit-none-actorder": "gptqmodel",
           "2bit-64g-actorder-asym": "transformers", "4bit-32g-actorder-mse": "gptqmodel,transformers",
           "3bit-64g-asym-mse": "transformers"}


needs_gptqmodel = pytest.mark.skipif(
    not REQUIRED and not GPTQMODEL_PYTHON.is_file(),
    reason=f"GPTQModel venv not found at {GPTQMODEL_PYTHON} (bash scripts/gptqmodel_venv.sh creates it)")


def gptqmodel_logits(branches: dict[Path, str], ids: np.ndarray, tmp_path: Path) -> dict[str, dict[str, int]]:
    """Load each branch with its loaders (``"gptqmodel,transformers"``) in GPTQModel's venv; logits land next to it."""
    assert GPTQMODEL_PYTHON.is_file(), f"$QUANTMILL_GPTQMODEL_PYTHON={GPTQMODEL_PYTHON} does not exist"
    np.save(tmp_path / "ids.npy", ids)
    args = [f"{path}={loaders}" for path, loaders in branches.items()]
    done = subprocess.run([str(GPTQMODEL_PYTHON), "-c", WORKER, str(tmp_path / "ids.npy"), *args], capture_output=True,
                          text=True, timeout=1500, check=False,
                          # eager kernels: the same arithmetic, without compiling every module with inductor first
                          env={**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "TORCH_COMPILE_DISABLE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def assert_logits_match(branches: dict[Path, str], loaded: dict[str, dict[str, int]], ids: np.ndarray, n_linears: int) -> None:
    """Every loader turned every linear into a GPTQ module and gives quantmill's dequantized logits (rel. error < 1e-3)."""
    for path, loaders in branches.items():
        with torch.no_grad():
            ours = load_dequantized_model(path)(input_ids=torch.from_numpy(ids)).logits.numpy()
        assert sorted(loaded[str(path)]) == sorted(loaders.split(","))
        for loader, modules in loaded[str(path)].items():
            assert modules == n_linears, (path, loader)
            theirs = np.load(path / f"{loader}_logits.npy")
            rel = float(np.linalg.norm(theirs - ours) / np.linalg.norm(ours))
            assert rel < 1e-3, (path, loader, rel)


@pytest.mark.slow
@needs_gptqmodel
def test_gptqmodel_loads_quantmill_branches_with_identical_logits(make_tiny_llama, tmp_path: Path) -> None:
    model_dir = make_tiny_llama("bpe", name="tiny", dtype="float16", num_hidden_layers=2, tie_word_embeddings=True)
    calib = sample_sequences(CalibrationText("ayli", (TEXT,)), load_tokenize(model_dir), samples=4, seqlen=64, seed=1)
    results = quantize_branches(model_dir, calib, parse_branches(list(LOADERS)), tmp_path / "out", EngineOptions(progress=False))
    ids = np.random.Generator(np.random.PCG64(0)).integers(0, 49152, size=(2, 48))
    branches = {r.directory: LOADERS[r.spec.short] for r in results}
    assert_logits_match(branches, gptqmodel_logits(branches, ids, tmp_path), ids, 14)  # 7 linears x 2 layers


# Family replicas whose GPTQ branches GPTQModel 7.6 must load, and the loaders that can. transformers' GPTQ
# loader (optimum 2.3) converts only modules whose type is exactly nn.Linear and skips Falcon's FalconLinear
# subclass, so it loads no Falcon GPTQ checkpoint at all (any producer's): Falcon is checked with GPTQModel's loader.
FAMILY_BRANCHES = ("4bit-32g-actorder", "8bit-none")
FAMILY_LOADERS = {"falcon-7b": "gptqmodel", "falcon-40b": "gptqmodel", "qwen2": "gptqmodel,transformers",
                  "qwen3": "gptqmodel,transformers"}


@pytest.mark.slow
@needs_gptqmodel
@pytest.mark.parametrize("family", sorted(FAMILY_LOADERS))
def test_gptqmodel_loads_branches_of_other_families(family: str, family_model, tmp_path: Path) -> None:
    """Falcon (both layouts: GPTQModel maps falcon to its RefinedWeb tree) and Qwen2/3 branches load with quantmill's logits."""
    from families import FAMILIES

    model_dir = family_model(family, dtype="float16")
    calib = sample_sequences(CalibrationText("ayli", (TEXT,)), load_tokenize(model_dir), samples=4, seqlen=64, seed=1)
    results = quantize_branches(model_dir, calib, parse_branches(list(FAMILY_BRANCHES)), tmp_path / "out",
                                EngineOptions(progress=False))
    ids = np.random.Generator(np.random.PCG64(0)).integers(0, 49152, size=(2, 48))
    branches = {r.directory: FAMILY_LOADERS[family] for r in results}
    n_linears = FAMILIES[family].linears_per_layer * FAMILIES[family].layers
    assert_logits_match(branches, gptqmodel_logits(branches, ids, tmp_path), ids, n_linears)
