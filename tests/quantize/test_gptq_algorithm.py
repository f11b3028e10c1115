"""The GPTQ algorithm on small random matrices: every bits x group x act-order x sym combination."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from quantmill.errors import UserInputError
from quantmill.quantize.gptq.algorithm import FALLBACK_RTN, damp_schedule, gptq_quantize, inverse_cholesky_upper
from quantmill.quantize.gptq.branches import BranchSpec, parse_branch, parse_branches
from quantmill.quantize.gptq.grid import find_grid
from quantmill.quantize.gptq.packing import dequantize_linear, pack_linear, unpack_linear

ROWS, COLS = 64, 160  # 160 columns: group 64 and 128 leave a partial last group


def correlated_problem(seed: int = 0, rows: int = ROWS, cols: int = COLS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(2048, cols, generator=g) @ mix * torch.linspace(0.2, 3.0, cols)
    w = torch.randn(rows, cols, generator=g) * 0.05
    return w, x.T @ x, x


COMBOS = list(itertools.product((2, 3, 4, 8), (-1, 32, 64, 128), (False, True), (True, False)))


@pytest.mark.parametrize(("bits", "group", "act_order", "sym"), COMBOS)
def test_every_combination_packs_exactly(bits: int, group: int, act_order: bool, sym: bool) -> None:
    w, h, _x = correlated_problem(bits * 7 + group)
    spec = BranchSpec(bits=bits, group_size=group, desc_act=act_order, sym=sym)
    result = gptq_quantize(w, h, spec)
    n_groups = 1 if group == -1 else -(-COLS // group)
    assert result.scales.shape == (n_groups, ROWS) and result.zeros.shape == (n_groups, ROWS)
    assert result.fallback is None and result.damp_percent == 0.01 and result.hessian_dtype == "float32"
    g_idx = result.g_idx.numpy()
    assert sorted(set(g_idx.tolist())) == list(range(n_groups))
    counts = np.bincount(g_idx, minlength=n_groups)
    size = COLS if group == -1 else group
    assert counts[:-1].tolist() == [size] * (n_groups - 1) and counts[-1] == COLS - size * (n_groups - 1)
    if not act_order:
        assert np.array_equal(g_idx, np.arange(COLS) // size)
    codes, zeros = result.codes.numpy(), result.zeros.numpy()
    assert codes.max() <= (1 << bits) - 1 and zeros.min() >= 1
    if sym:
        assert (zeros == 1 << (bits - 1)).all()
    packed = pack_linear(codes, result.scales.numpy(), zeros, g_idx, bits)
    got_codes, got_zeros = unpack_linear(packed)
    assert np.array_equal(got_codes, codes) and np.array_equal(got_zeros, zeros)
    assert np.array_equal(dequantize_linear(packed), result.dequantized.numpy())


def _rtn(w: torch.Tensor, spec: BranchSpec) -> torch.Tensor:
    group = w.shape[1] if spec.group_size == -1 else spec.group_size
    out = torch.empty_like(w)
    for start in range(0, w.shape[1], group):
        grid = find_grid(w[:, start : start + group], spec.bits, spec.sym)
        out[:, start : start + group] = grid.dequantize(grid.codes(w[:, start : start + group]))
    return out


@pytest.mark.parametrize("spec_text", ["4bit-64g", "4bit-64g-actorder", "3bit-128g-actorder", "2bit-32g-actorder-asym", "4bit-none"])
def test_gptq_beats_round_to_nearest_on_the_layer_output(spec_text: str) -> None:
    w, h, x = correlated_problem(1)
    spec = parse_branch(spec_text)
    result = gptq_quantize(w, h, spec)
    gptq_err = float(((x @ (w - result.dequantized).T) ** 2).sum())
    rtn_err = float(((x @ (w - _rtn(w, spec)).T) ** 2).sum())
    assert gptq_err < 0.8 * rtn_err
    assert result.loss == pytest.approx(gptq_err / 2, rel=0.35)  # GPTQ's own estimate of its objective


def test_static_groups_keep_contiguous_groups_under_act_order() -> None:
    w, h, _x = correlated_problem(2)
    result = gptq_quantize(w, h, parse_branch("4bit-32g-actorder-static"))
    assert np.array_equal(result.g_idx.numpy(), np.arange(COLS) // 32)
    for g in range(COLS // 32):  # each group's grid is fixed from the unquantized weights
        grid = find_grid(w[:, g * 32 : (g + 1) * 32], 4, True)
        assert torch.equal(result.scales[g], grid.scale)


def test_dead_columns_are_zero() -> None:
    w, h, _x = correlated_problem(3)
    h[5, :] = 0
    h[:, 5] = 0
    result = gptq_quantize(w, h, parse_branch("4bit-32g-actorder"))
    assert torch.all(result.dequantized[:, 5] == 0)


def test_damp_escalates_then_falls_back_to_round_to_nearest() -> None:
    assert damp_schedule(0.01) == [0.01, 0.1, 1.0]
    w, h, _x = correlated_problem(4)
    # strongly indefinite: only a large damp makes it positive definite
    bad = h - 0.05 * torch.diagonal(h).mean() * torch.eye(COLS)
    factor = inverse_cholesky_upper(bad, 0.01)
    assert factor is not None and factor[1] >= 0.1
    result = gptq_quantize(w, bad, parse_branch("4bit-64g"))
    assert result.fallback is None and result.damp_percent >= 0.1
    broken = h.clone()
    broken[0, 0] = float("nan")
    fallback = gptq_quantize(w, broken, parse_branch("4bit-64g"))
    assert fallback.fallback == FALLBACK_RTN and fallback.damp_percent is None
    assert torch.equal(fallback.dequantized, _rtn(w, parse_branch("4bit-64g")))


def test_grid_zero_is_never_zero_for_asymmetric() -> None:
    w = torch.rand(8, 32) + 0.1  # all positive: the plain asymmetric grid would pick zero 0
    for bits in (2, 3, 4, 8):
        grid = find_grid(w, bits, sym=False)
        assert (grid.zero >= 1).all()
        q = grid.dequantize(grid.codes(w))
        assert float((q - w).abs().max()) <= float(grid.scale.max()) * 0.51


def test_branch_names_and_parsing() -> None:
    cases = {
        "4bit-128g-actorder": "gptq-4bit-128g-actorder_True",
        "8bit-none-actorder": "gptq-8bit--1g-actorder_True",
        "4bit-32g-actorder": "gptq-4bit-32g-actorder_True",
        "3bit-64g": "gptq-3bit-64g-actorder_False",
        "4bit-64g-actorder-asym": "gptq-4bit-64g-actorder_True-asym",
        "gptq-8bit--1g-actorder_True": "gptq-8bit--1g-actorder_True",
        "4bit-128g-actorder-static": "gptq-4bit-128g-actorder_True-static",
    }
    for short, name in cases.items():
        spec = parse_branch(short)
        assert spec.release_name == name
        assert parse_branch(spec.short) == spec
    main = parse_branch("main=4bit-128g-actorder")
    assert main.name == "main" and main.release_name == "gptq-4bit-128g-actorder_True"
    config = parse_branch("8bit-none-actorder", damp_percent=0.05).quantization_config()
    assert config["group_size"] == -1 and config["bits"] == 8 and config["desc_act"] is True
    assert config["damp_percent"] == 0.05 and config["checkpoint_format"] == "gptq" and config["quant_method"] == "gptq"


@pytest.mark.parametrize(("spec", "message"), [
    ("5bit-128g", "5-bit GPTQ is not supported"),
    ("4bit-96g", "group size 96 is not supported"),
    ("4bit", "needs bits and group size"),
    ("4bit-128g-fast", "unknown word 'fast'"),
    ("4bit-128g-sym-asym", "contradicts itself"),
    ("bad name=4bit-128g", "is not a valid name; use letters"),
])
def test_bad_branch_specs(spec: str, message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        parse_branch(spec)


def test_duplicate_branch_names_are_refused() -> None:
    with pytest.raises(UserInputError, match="both write branch"):
        parse_branches(["4bit-128g-actorder", "gptq-4bit-128g-actorder_True"])
    with pytest.raises(UserInputError, match="--damp"):
        parse_branches(["4bit-128g"], damp_percent=0.0)
