"""GPTQ (Frantar et al., 2022) for one weight matrix, given the Hessian of its inputs.

    result = gptq_quantize(weight, hessian, spec)     # weight (rows, cols), hessian (cols, cols)

``hessian`` is XᵀX (any positive multiple of it: H = 2·XᵀX/N gives the same result). Columns
are quantized one at a time in ``spec.block_size`` blocks; each column's rounding error is
spread over the columns not yet quantized through the upper Cholesky factor of H⁻¹ (lazy
batch updates across blocks). With ``desc_act`` columns go in order of decreasing H diagonal;
``g_idx`` maps each (original) column to its group. ``static_groups`` fixes every group's grid
from the unquantized weights before reordering, so groups stay contiguous. A group's grid is
chosen as ``spec.grid`` says (:mod:`quantmill.quantize.gptq.grid`: min/max, or the mse clipping
search weighted by H's diagonal of the group's columns, permuted with them under act-order).

Damping: ``damp_percent × mean(diag H)`` is added to the diagonal. If the Cholesky
factorisation fails, it is retried in float64, then with 10× the damping (float32, float64),
and so on up to damp_percent 1.0. If every try fails (a Hessian with inf/NaN), the matrix is
rounded to its grid without error feedback (round-to-nearest); ``fallback`` records it.
Runs on the device of ``weight`` (CPU or CUDA).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from quantmill.quantize.gptq.grid import Grid, choose_grid

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


def _static_grids(w: torch.Tensor, diag: torch.Tensor, spec: BranchSpec, group: int) -> list[Grid]:
    return [choose_grid(w[:, start : start + group], spec.bits, spec.sym, diag[start : start + group], spec.grid_options)
            for start in range(0, w.shape[1], group)]


@contextlib.contextmanager
def _single_thread(device: torch.device) -> Iterator[None]:
    """One CPU thread for GPTQ's own work: its column loop's operations are too small to gain from
    more, and on a busy machine every parallel region waits for the slowest thread (measured on a
    shared 2-core machine: column loop 5x, cholesky_inverse 40x slower with 2 threads than with 1)."""
    import torch

    previous = torch.get_num_threads()
    if device.type == "cpu" and previous > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


@dataclass
class _Sweep:
    """The state of one GPTQ pass over the (permuted) columns, stored transposed: one column is
    one contiguous row, so each step's vector operations and rank-1 update run over contiguous memory."""

    wt: torch.Tensor  # (cols, rows): weights, updated as errors are spread
    hinv: torch.Tensor  # upper Cholesky factor of H⁻¹
    diag: torch.Tensor  # (cols,) H's diagonal (undamped), in processing order: the grid search's column weights
    spec: BranchSpec
    group: int
    order: list[int]  # original column of each processed column
    static: list[Grid]
    codes: torch.Tensor  # (cols, rows)
    deq: torch.Tensor  # (cols, rows)
    row_loss: torch.Tensor
    grids: list[Grid]

    def block(self, i1: int, i2: int) -> None:
        """Quantize columns [i1, i2), then spread their errors over the later columns (lazy batch update)."""
        import torch

        w1 = self.wt[i1:i2].clone()
        err1 = torch.empty_like(w1)
        hinv1 = self.hinv[i1:i2, i1:i2]
        grid = self.grids[-1] if self.grids and not self.static else None
        for i in range(i2 - i1):
            col = i1 + i
            if self.static:
                grid = self.static[self.order[col] // self.group]
            elif col % self.group == 0:  # a group starts: its grid comes from the weights as updated so far
                end = col + self.group
                span = w1[i : i + self.group] if end <= i2 else torch.cat((w1[i:], self.wt[i2:end]))
                grid = choose_grid(span.t(), self.spec.bits, self.spec.sym, self.diag[col:end], self.spec.grid_options)
                self.grids.append(grid)
            assert grid is not None
            x = w1[i]
            q = grid.codes(x)
            qx = grid.dequantize(q)
            self.codes[col] = q
            self.deq[col] = qx
            e = err1[i]
            torch.sub(x, qx, out=e)
            e.div_(hinv1[i, i])
            w1[i:].addr_(hinv1[i, i:], e, alpha=-1.0)
        self.row_loss += (err1.double() ** 2).sum(dim=0) / 2
        self.wt[i2:].addmm_(self.hinv[i1:i2, i2:].t(), err1, alpha=-1.0)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: BranchSpec) -> GptqResult:
    """Quantize ``weight`` (rows, cols) with GPTQ under ``hessian`` (cols, cols) as ``spec`` says."""
    with _single_thread(weight.device):
        return _gptq(weight, hessian, spec)


def _gptq(weight: torch.Tensor, hessian: torch.Tensor, spec: BranchSpec) -> GptqResult:
    import torch

    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float32).clone()
    rows, cols = w.shape
    group = cols if spec.group_size == -1 else spec.group_size
    block = spec.block_size if spec.group_size == -1 else max(group, spec.block_size // group * group)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    static = _static_grids(w, torch.diagonal(h), spec, group) if spec.static_groups else []
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if spec.desc_act else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    diag = torch.diagonal(h).clone()
    factor = inverse_cholesky_upper(h, spec.damp_percent)
    del h
    if factor is None:
        hinv, damp, dtype, fallback = torch.eye(cols, device=w.device), None, None, FALLBACK_RTN
    else:
        (hinv, damp, dtype), fallback = factor, None
    sweep = _Sweep(
        w.t().contiguous(), hinv, diag, spec, group, perm.tolist() if perm is not None else list(range(cols)), static,
        torch.zeros(cols, rows, device=w.device), torch.zeros(cols, rows, device=w.device),
        torch.zeros(rows, dtype=torch.float64, device=w.device), [],
    )
    del w
    for i1 in range(0, cols, block):
        sweep.block(i1, min(i1 + block, cols))
    codes, deq = sweep.codes.t(), sweep.deq.t()
    columns = torch.arange(cols, device=hinv.device)
    position = columns  # where each original column was processed
    if perm is not None:
        position = torch.argsort(perm)
        codes, deq = codes[:, position], deq[:, position]
    g_idx = (columns if spec.static_groups else position) // group
    grids = static or sweep.grids
    return GptqResult(
        codes=codes.to(torch.uint8).contiguous(),
        scales=torch.stack([g.scale for g in grids]),
        zeros=torch.stack([g.zero for g in grids]).to(torch.int32),
        g_idx=g_idx.to(torch.int32),
        dequantized=deq.contiguous(),
        damp_percent=damp,
        hessian_dtype=dtype,
        fallback=fallback,
        row_loss=sweep.row_loss,
    )
