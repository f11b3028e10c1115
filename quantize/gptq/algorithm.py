"""GPTQ (Frantar et al., 2022) for one weight matrix, given the Hessian of its inputs.

    result = gptq_quantize(weight, hessian, spec)     # weight (rows, cols), hessian (cols, cols)

``hessian`` is XᵀX (any positive multiple of it: H = 2·XᵀX/N gives the same result). Columns
are quantized one at a time in ``spec.block_size`` blocks; each column's rounding error is
spread over the columns not yet quantized through the upper Cholesky factor of H⁻¹ (lazy
batch updates across blocks). With ``desc_act`` columns go in order of decreasing H diagonal;
``g_idx`` maps each (original) column to its group. ``static_groups`` fixes every group's grid
from the unquantized weights before reordering, so groups stay contiguous.

Damping: ``damp_percent × mean(diag H)`` is added to the diagonal. If the Cholesky
factorisation fails, it is retried in float64, then with 10× the damping (float32, float64),
and so on up to damp_percent 1.0. If every try fails (a Hessian with inf/NaN), the matrix is
rounded to its grid without error feedback (round-to-nearest); ``fallback`` records it.
Runs on the device of ``weight`` (CPU or CUDA).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from quantmill.quantize.gptq.grid import Grid, find_grid

if TYPE_CHECKING:
    import torch

    from quantmill.quantize.gptq.branches import BranchSpec

FALLBACK_RTN = "rtn"
MAX_DAMP_PERCENT = 1.0


@dataclass
class GptqResult:
    """Integer codes, grids and the group of each column; all in the original column order."""

    codes: torch.Tensor  # (rows, cols) uint8
    scales: torch.Tensor  # (groups, rows) float32 holding float16 values
    zeros: torch.Tensor  # (groups, rows) int32
    g_idx: torch.Tensor  # (cols,) int32
    dequantized: torch.Tensor  # (rows, cols) float32: what the algorithm produced
    damp_percent: float | None  # damping actually used; None when it fell back
    hessian_dtype: str | None  # "float32" / "float64"; None when it fell back
    fallback: str | None  # None, or FALLBACK_RTN
    row_loss: torch.Tensor  # (rows,) float64: Σ (w - q)² / (2 · d²), GPTQ's objective, per row

    @property
    def loss(self) -> float:
        return float(self.row_loss.sum())

    def rows(self, start: int, stop: int) -> GptqResult:
        """The result restricted to output rows [start, stop) (matrices quantized stacked)."""
        return GptqResult(
            self.codes[start:stop], self.scales[:, start:stop], self.zeros[:, start:stop], self.g_idx,
            self.dequantized[start:stop], self.damp_percent, self.hessian_dtype, self.fallback, self.row_loss[start:stop],
        )


def damp_schedule(damp_percent: float) -> list[float]:
    """damp_percent, then ×10 each step, capped at 1.0."""
    steps = [damp_percent]
    while steps[-1] < MAX_DAMP_PERCENT:
        steps.append(min(MAX_DAMP_PERCENT, steps[-1] * 10))
    return steps


def inverse_cholesky_upper(hessian: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor, float, str] | None:
    """Upper Cholesky factor of (H + damp·I)⁻¹ in float32, the damp used and the dtype it needed."""
    import torch

    mean_diag = float(torch.diagonal(hessian).double().mean())
    if not math.isfinite(mean_diag) or mean_diag <= 0:
        return None
    for percent in damp_schedule(damp_percent):
        for dtype in (torch.float32, torch.float64):
            h = hessian.to(dtype).clone()
            h.diagonal().add_(percent * mean_diag)
            lower, info = torch.linalg.cholesky_ex(h)
            if int(info) != 0:
                continue
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper.to(torch.float32), percent, str(dtype).removeprefix("torch.")
    return None


def _static_grids(w: torch.Tensor, spec: BranchSpec, group: int) -> list[Grid]:
    return [find_grid(w[:, start : start + group], spec.bits, spec.sym) for start in range(0, w.shape[1], group)]


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: BranchSpec) -> GptqResult:
    """Quantize ``weight`` (rows, cols) with GPTQ under ``hessian`` (cols, cols) as ``spec`` says."""
    import torch

    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float32).clone()
    rows, cols = w.shape
    group = cols if spec.group_size == -1 else spec.group_size
    block = spec.block_size if spec.group_size == -1 else max(group, spec.block_size // group * group)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    static = _static_grids(w, spec, group) if spec.static_groups else []
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if spec.desc_act else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    factor = inverse_cholesky_upper(h, spec.damp_percent)
    del h
    if factor is None:
        hinv, damp, dtype, fallback = torch.eye(cols, device=w.device), None, None, FALLBACK_RTN
    else:
        (hinv, damp, dtype), fallback = factor, None
    order = perm.tolist() if perm is not None else list(range(cols))
    codes = torch.zeros_like(w)
    deq = torch.zeros_like(w)
    grids: list[Grid] = list(static)
    row_loss = torch.zeros(rows, dtype=torch.float64, device=w.device)
    grid: Grid | None = None
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if spec.static_groups:
                grid = static[order[col] // group]
            elif col % group == 0:  # a group starts: its grid comes from the weights as updated so far
                span = w1[:, i : i + group] if col + group <= i2 else torch.cat((w1[:, i:], w[:, i2 : col + group]), dim=1)
                grid = find_grid(span, spec.bits, spec.sym)
                grids.append(grid)
            assert grid is not None
            x = w1[:, i]
            q = grid.codes(x)
            qx = grid.dequantize(q)
            codes[:, col] = q
            deq[:, col] = qx
            d = hinv1[i, i]
            e = (x - qx) / d
            row_loss += e * e / 2
            w1[:, i:].addr_(e, hinv1[i, i:], alpha=-1.0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if perm is not None:
        inverse = torch.argsort(perm)
        codes, deq = codes[:, inverse], deq[:, inverse]
        position = inverse  # position of each original column in the processing order
    else:
        position = torch.arange(cols, device=w.device)
    columns = torch.arange(cols, device=w.device)
    g_idx = (columns if spec.static_groups else position) // group
    return GptqResult(
        codes=codes.to(torch.uint8),
        scales=torch.stack([g.scale for g in grids]),
        zeros=torch.stack([g.zero for g in grids]).to(torch.int32),
        g_idx=g_idx.to(torch.int32),
        dequantized=deq,
        damp_percent=damp,
        hessian_dtype=dtype,
        fallback=fallback,
        row_loss=row_loss,
    )
