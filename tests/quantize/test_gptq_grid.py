"""The mse grid (issue 15): never worse than min/max on its objective, its spec word, its record, its fingerprint."""
from __future__ import annotations

import hashlib
import itertools
import json
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from quantmill.calib_data.loaders import CalibrationText
from quantmill.calib_data.sampling import load_tokenize, sample_sequences
from quantmill.errors import UserInputError
from quantmill.quantize.gptq.algorithm import gptq_quantize
from quantmill.quantize.gptq.branches import BranchSpec, parse_branch, parse_branches
from quantmill.quantize.gptq.grid import find_grid, grid_objective, search_grid, shrink_factors

TEXT = (Path(__file__).resolve().parents[2] / "calib_data" / "corpora" / "calib_as_you_like_it.txt").read_text(encoding="utf-8")
SHAPES = ((1, 8), (7, 32), (33, 64), (96, 128), (16, 5))


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as GPTQ's column loop runs (small tensor operations: 2 threads on a busy machine are 50x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _weights(kind: str, rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=g) * 0.05
    if kind == "heavy":  # Student-t-like tails: the clip matters most
        w = w / torch.rand(rows, cols, generator=g).clamp(min=0.05).sqrt()
    elif kind == "positive":  # one sign: the asymmetric v1 zero rule comes in
        w = w.abs() + 0.01
    elif kind == "outlier":
        w[:, 0] *= 40.0
    elif kind == "sparse":  # some rows flat zero, some columns zero
        w[::3] = 0.0
        w[:, 1::4] = 0.0
    return w


def _diag(kind: str, cols: int, g: torch.Generator) -> torch.Tensor:
    if kind == "uniform":
        return torch.ones(cols)
    d = torch.rand(cols, generator=g) ** 4 * 100.0  # energies spread over orders of magnitude
    if kind == "dead":
        d[::5] = 0.0
    return d


CASES = list(itertools.product(SHAPES, (2, 3, 4, 8), (True, False), ("normal", "heavy", "positive", "outlier", "sparse")))


@pytest.mark.parametrize(("shape", "bits", "sym", "kind"), CASES)
def test_mse_grid_is_never_worse_than_minmax_on_its_objective(shape: tuple[int, int], bits: int, sym: bool, kind: str) -> None:
    rows, cols = shape
    for seed, diag_kind in itertools.product(range(3), ("uniform", "spread", "dead")):
        g = torch.Generator().manual_seed(zlib.crc32(repr((shape, bits, sym, kind, seed)).encode()))
        w, d = _weights(kind, rows, cols, g), _diag(diag_kind, cols, g)
        minmax, mse = find_grid(w, bits, sym), search_grid(w, bits, sym, d)
        before, after = grid_objective(w, minmax, d), grid_objective(w, mse, d)
        assert bool((after <= before).all()), (seed, diag_kind, float((after - before).max()))
        # every chosen grid is one the checkpoint can store: float16 scales, integer zeros >= 1 (v1), sym zeros centred
        assert torch.equal(mse.scale, mse.scale.half().float()) and bool((mse.scale > 0).all())
        assert torch.equal(mse.zero, mse.zero.round()) and bool((mse.zero >= 1).all()) and bool((mse.zero <= mse.maxq).all())
        if sym:
            assert bool((mse.zero == minmax.zero).all())


def test_mse_grid_gains_where_clipping_pays() -> None:
    g = torch.Generator().manual_seed(0)
    w = _weights("heavy", 256, 128, g)
    d = _diag("spread", 128, g)
    for bits in (2, 3, 4):
        before = grid_objective(w, find_grid(w, bits, True), d).sum()
        after = grid_objective(w, search_grid(w, bits, True, d), d).sum()
        assert after < 0.9 * before, bits


def test_coarse_to_fine_is_close_to_scoring_every_factor() -> None:
    g = torch.Generator().manual_seed(3)
    w, d = _weights("heavy", 256, 128, g), _diag("spread", 128, g)
    for bits, sym in ((3, True), (4, False)):
        full = grid_objective(w, search_grid(w, bits, sym, d, stride=1), d).sum()
        fast = grid_objective(w, search_grid(w, bits, sym, d), d).sum()
        assert full <= fast <= 1.001 * full


def test_minmax_is_the_first_candidate_exactly() -> None:
    """p = 1 is exactly 1 and a search with nothing to gain (flat rows, one step) returns the min/max grid bit for bit."""
    assert float(shrink_factors(0.2, 80)[0]) == 1.0 and float(shrink_factors(0.2, 80)[-1]) == pytest.approx(0.2)
    assert len(shrink_factors(0.2, 80)) == 81
    w = torch.zeros(4, 16)
    for sym in (True, False):
        grid, minmax = search_grid(w, 4, sym, torch.ones(16)), find_grid(w, 4, sym)
        assert torch.equal(grid.scale, minmax.scale) and torch.equal(grid.zero, minmax.zero)
    # all the weight on columns no input reaches: every candidate scores 0, the tie goes to min/max
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    grid, minmax = search_grid(w, 3, False, torch.zeros(16)), find_grid(w, 3, False)
    assert torch.equal(grid.scale, minmax.scale) and torch.equal(grid.zero, minmax.zero)


def test_search_is_weighted_by_the_hessian_diagonal() -> None:
    """A column with all the input energy decides the clip: with it an outlier, min/max wins; unweighted, it is clipped."""
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2)) * 0.05
    w[:, 0] = 1.0
    heavy = torch.full((64,), 1e-6)
    heavy[0] = 1.0
    assert torch.equal(search_grid(w, 4, True, heavy).scale, find_grid(w, 4, True).scale)
    clipped = search_grid(w, 4, True, torch.ones(64)).scale < find_grid(w, 4, True).scale
    assert int(clipped.sum()) >= 8


def _problem(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cols = 160
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(2048, cols, generator=g) @ mix * torch.linspace(0.2, 3.0, cols)
    w = torch.randn(64, cols, generator=g) * 0.05 / torch.rand(64, cols, generator=g).clamp(min=0.05).sqrt()
    return w, x.T @ x, x


@pytest.mark.parametrize("spec_text", ["4bit-64g-actorder", "3bit-32g", "4bit-32g-actorder-static", "2bit-64g-actorder-asym"])
def test_gptq_with_the_mse_grid_lowers_the_layer_output_error(spec_text: str) -> None:
    w, h, x = _problem(5)
    errors = {}
    for grid in ("minmax", "mse"):
        result = gptq_quantize(w, h, parse_branch(f"{spec_text}-{grid}"))
        errors[grid] = float(((x @ (w - result.dequantized).T) ** 2).sum())
        assert torch.equal(result.scales, result.scales.half().float())
    assert errors["mse"] < errors["minmax"], errors


@pytest.mark.parametrize("text", ["4bit-64g-actorder-mse", "4bit-128g-actorder-asym-static-mse", "3bit-none-mse",
                                  "2bit-32g-mse-ct", "main=8bit-64g-actorder-mse", "gptq-4bit-64g-actorder_True-mse",
                                  "4bit-64g-minmax"])
def test_mse_spec_word_round_trips(text: str) -> None:
    spec = parse_branch(text)
    assert parse_branch(spec.short) == spec and parse_branch(spec.release_name).release_name == spec.release_name
    assert spec.release_name.endswith("-mse" + spec.checkpoint_format.suffix) == (spec.grid == "mse")
    assert ("mse" in spec.short.split("-")) == (spec.grid == "mse") and "minmax" not in spec.short


def test_mse_release_names_and_configs() -> None:
    mse = parse_branch("4bit-64g-actorder-mse")
    assert mse.grid == "mse" and mse.release_name == "gptq-4bit-64g-actorder_True-mse"
    assert parse_branch("4bit-64g-actorder-asym-mse").release_name == "gptq-4bit-64g-actorder_True-asym-mse"
    assert parse_branch("4bit-64g-actorder-mse-ct").release_name == "gptq-4bit-64g-actorder_True-mse-compressed-tensors"
    config = mse.quantization_config()
    assert config["grid"] == "mse" and mse.gptqmodel_meta() == {"mse": 2.0}  # GPTQModel writes its mse in meta
    assert config["grid_shrink_range"] == [0.2, 1.0] and config["grid_steps"] == 80 and config["grid_stride"] == 4
    plain = parse_branch("4bit-64g-actorder").quantization_config()
    assert not {"mse", "grid", "grid_shrink_range", "grid_steps"} & set(plain)  # min/max: the config loaders always saw
    assert parse_branch("4bit-64g-actorder").gptqmodel_meta() == {}
    assert {k: v for k, v in config.items() if k in plain} == plain
    with pytest.raises(UserInputError, match="contradicts itself"):
        parse_branch("4bit-64g-mse-minmax")
    with pytest.raises(UserInputError, match="grid 'best' is not known"):
        BranchSpec(bits=4, group_size=64, grid="best")
    with pytest.raises(UserInputError, match="smallest shrink"):
        BranchSpec(bits=4, group_size=64, grid="mse", grid_min_shrink=1.5)
    assert len({b.name for b in parse_branches(["4bit-64g-actorder", "4bit-64g-actorder-mse"])}) == 2


def test_compressed_tensors_branch_records_the_observer() -> None:
    from quantmill.quantize.gptq.formats import checkpoint_format

    spec = parse_branch("4bit-64g-actorder-mse-ct")
    config = checkpoint_format(spec.format).config(spec, {})
    assert config["config_groups"]["group_0"]["weights"]["observer"] == "mse"
    plain = parse_branch("4bit-64g-actorder-ct")
    assert checkpoint_format(plain.format).config(plain, {})["config_groups"]["group_0"]["weights"]["observer"] == "minmax"


def test_recipe_branch_takes_grid_mse() -> None:
    from pydantic import ValidationError

    from quantmill.recipe import GptqBranch

    spec = GptqBranch(bits=4, group_size=64, grid="mse").spec()
    assert spec == parse_branch("4bit-64g-actorder-mse")
    assert GptqBranch(bits=4, group_size=64).spec().grid == "minmax"
    with pytest.raises(ValidationError):
        GptqBranch(bits=4, group_size=64, grid="best")


def test_a_minmax_layer_checkpoint_is_not_resumed_for_mse(make_tiny_llama, tmp_path: Path) -> None:
    """The pass's fingerprint holds asdict(spec): a grid changes it, so a layer checkpoint of min/max is discarded."""
    from quantmill.quantize.gptq.engine import EngineOptions, _fingerprint, quantize_branches
    from quantmill.quantize.resume import LayerCheckpoint

    model = make_tiny_llama("bpe", name="tiny3", dtype="float16", num_hidden_layers=3, tie_word_embeddings=True)
    calib = sample_sequences(CalibrationText("ayli", (TEXT,)), load_tokenize(model), samples=4, seqlen=32, seed=1)
    runner = SimpleNamespace(raw_config={"model_type": "llama"})
    options = EngineOptions(progress=False, checkpoint_dir=tmp_path / "checkpoints")

    def fingerprint(text: str) -> dict[str, object]:
        return _fingerprint(runner, calib, [SimpleNamespace(spec=parse_branch(text))], options)  # type: ignore[arg-type]

    assert fingerprint("4bit-32g-actorder") != fingerprint("4bit-32g-actorder-mse")
    assert fingerprint("4bit-32g-actorder")["branches"][0]["grid"] == "minmax"  # type: ignore[index]
    # a checkpoint saved for min/max (a killed pass) is not loaded by the mse pass
    LayerCheckpoint(tmp_path / "checkpoints", fingerprint("4bit-32g-actorder")).save(2, {}, {"branches": []})
    assert LayerCheckpoint(tmp_path / "checkpoints", fingerprint("4bit-32g-actorder-mse")).load() is None
    # and an mse pass run over such a checkpoint writes what an mse pass without one writes: deterministic, same bytes
    LayerCheckpoint(tmp_path / "checkpoints", fingerprint("4bit-32g-actorder")).save(2, {}, {"branches": []})
    [resumed] = quantize_branches(model, calib, parse_branches(["4bit-32g-actorder-mse"]), tmp_path / "a", options)
    [clean] = quantize_branches(model, calib, parse_branches(["4bit-32g-actorder-mse"]), tmp_path / "b",
                                EngineOptions(progress=False))
    names = sorted(p.name for p in resumed.directory.iterdir())
    assert names == sorted(p.name for p in clean.directory.iterdir()) and "model.safetensors" in names
    for name in names:
        assert (hashlib.sha256((resumed.directory / name).read_bytes()).digest()
                == hashlib.sha256((clean.directory / name).read_bytes()).digest()), name
    qconfig = json.loads((clean.directory / "quantize_config.json").read_text())
    assert qconfig["grid"] == "mse" and qconfig["meta"]["mse"] == 2.0 and clean.directory.name == "gptq-4bit-32g-actorder_True-mse"
    assert qconfig["grid_shrink_range"] == [0.2, 1.0] and qconfig["grid_steps"] == 80
