"""The quantization grid of one group of weight columns: per output row a scale and an integer zero.

A weight ``w`` is stored as the code ``q = clamp(round(w / scale) + zero, 0, maxq)`` and read
back as ``scale * (q - zero)``. Scales are rounded to float16 here, before any code is chosen,
because the checkpoint stores them in float16: what the algorithm computes is then exactly
what a loader dequantizes (``scale * (q - zero)`` is exact in float32).

* symmetric: ``zero = (maxq + 1) / 2`` and ``scale = 2·max|w| / maxq`` (the range is centred on
  zero even when a row's weights are all of one sign);
* asymmetric: the range [min(w, 0), max(w, 0)] is mapped onto [0, maxq]. The v1 checkpoint
  format stores ``zero - 1`` as an unsigned ``bits``-wide field, so a zero of 0 cannot be
  written; such rows take ``zero = 1`` and ``scale = max(w) / (maxq - 1)`` instead.

Two ways to choose the range, one record each in :data:`GRIDS` (a branch's ``grid``):

* ``minmax``: the range above, as is (what AutoGPTQ and GPTQModel do by default);
* ``mse``: a clipping search (:func:`search_grid`). The range is shrunk by each factor
  ``p = 1, 1 - (1 - min_shrink)/steps, ..., min_shrink`` and the grid built from the shrunk range
  by exactly the min/max rules (same float16 rounding, same v1 zero rule); per row the ``p``
  whose reconstruction error ``Σ_j d_j·(w_ij − q_ij)²`` is smallest is kept, with ``d`` the
  Hessian diagonal of the group's columns (the columns' input energy). ``p = 1`` is the min/max
  grid itself and wins ties, so on that objective the search is never worse than min/max. The
  search is coarse to fine (every 4th factor, then the 3 on either side of each row's best: 27 of
  the 81 default factors scored, within 0.02 % of scoring all 81 on random heavy-tailed groups).

  GPTQModel 7.6's ``mse`` option (``QuantizeConfig(mse=NORM)``; ``Quantizer.find_params``, as in
  AutoGPTQ) searches the same kind of shrunk ranges but differs: it tries ``p = 1 - i/grid`` for
  ``i < maxshrink·grid`` (``configure`` defaults grid 100, maxshrink 0.8: p = 1.00 … 0.21, 80
  candidates, one Python loop step each), scores each by the *unweighted* ``Σ_j |w_ij − q_ij|^NORM``,
  with unrounded float32 scales (float16 only when packed), and for
  asymmetric grids re-rounds the zero of each shrunk range without the v1 rule (and at 2 bits also
  tries the neighbouring zero). Ours weights each column by the energy of its inputs, so the columns
  that matter to the layer's output decide the clip; every candidate is exactly a grid the checkpoint
  can store; p goes down to ``min_shrink`` itself (81 candidates by default) and all are scored at once.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    GridChooser = Callable[[torch.Tensor, int, bool, torch.Tensor, "GridOptions"], "Grid"]

FP16_SMALLEST = 2.0**-24  # smallest positive float16 (subnormal); scales never round to zero
FP16_LARGEST = 65504.0
MSE_MIN_SHRINK = 0.2  # the smallest range tried, as a fraction of min/max's (GPTQModel: 1 - maxshrink 0.8)
MSE_STEPS = 80  # shrink factors after 1.0: 1.00, 0.99, ..., 0.20 (GPTQModel's grid 100 spacing)
SEARCH_CHUNK_ELEMENTS = 1 << 19  # candidates × rows × columns evaluated at once (2 MiB of float32)
CLOSE_CALL = 1e-4  # relative float32 error margin below which float64 re-scores a row's choice against min/max
SEARCH_STRIDE = 4  # the coarse pass scores every 4th factor, the fine pass the 3 on either side of each row's best


@dataclass(frozen=True)
class Grid:
    """Scales (float32 holding float16 values) and integer zeros (float32 holding integers), per row."""

    scale: torch.Tensor  # (rows,)
    zero: torch.Tensor  # (rows,)
    maxq: int

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """Integer codes (as float32) of ``w``: (rows,) or (rows, cols)."""
        import torch

        scale, zero = (self.scale, self.zero) if w.dim() == 1 else (self.scale[:, None], self.zero[:, None])
        return torch.clamp(torch.round(w / scale) + zero, 0, self.maxq)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        scale, zero = (self.scale, self.zero) if codes.dim() == 1 else (self.scale[:, None], self.zero[:, None])
        return scale * (codes - zero)


@dataclass(frozen=True)
class GridOptions:
    """How a branch chooses its grids: ``grid`` is a key of :data:`GRIDS`; the rest is the mse search's."""

    grid: str = "minmax"
    min_shrink: float = MSE_MIN_SHRINK
    steps: int = MSE_STEPS
    stride: int = SEARCH_STRIDE


def _fp16_exact(values: torch.Tensor) -> torch.Tensor:
    import torch

    return values.clamp(FP16_SMALLEST, FP16_LARGEST).to(torch.float16).to(torch.float32)


def _scale_zero(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of the ranges [xmin, xmax] (any shape; xmin <= 0 <= xmax elementwise)."""
    import torch

    if sym:
        amax = torch.maximum(xmax, -xmin)
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)
        scale = _fp16_exact(2.0 * amax / maxq)
        return scale, torch.full_like(scale, float((maxq + 1) // 2))
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -torch.ones_like(xmin), xmin)
    xmax = torch.where(flat, torch.ones_like(xmax), xmax)
    scale = _fp16_exact((xmax - xmin) / maxq)
    zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    low = zero < 1  # v1 cannot store zero 0: keep zero 1 and stretch the scale over max(w)
    if bool(low.any()):
        scale = torch.where(low, _fp16_exact(xmax / (maxq - 1)), scale)
        zero = torch.where(low, torch.ones_like(zero), zero)
    return scale, zero


def _range(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    return torch.clamp(w.min(dim=1).values, max=0.0), torch.clamp(w.max(dim=1).values, min=0.0)


def find_grid(w: torch.Tensor, bits: int, sym: bool) -> Grid:
    """The min/max grid for the columns ``w`` (rows, cols) of one group."""
    maxq = (1 << bits) - 1
    scale, zero = _scale_zero(*_range(w), maxq, sym)
    return Grid(scale, zero, maxq)


def shrink_factors(min_shrink: float = MSE_MIN_SHRINK, steps: int = MSE_STEPS) -> torch.Tensor:
    """``1, 1 - (1 - min_shrink)/steps, ..., min_shrink`` (float32; the first is exactly 1)."""
    import torch

    return 1.0 - torch.arange(steps + 1, dtype=torch.float64) * ((1.0 - min_shrink) / steps)


def grid_objective(w: torch.Tensor, grid: Grid, diag: torch.Tensor) -> torch.Tensor:
    """Per row ``Σ_j d_j·(w_ij − q_ij)²`` of ``w`` (rows, cols) on ``grid`` (float64, for checks and tests)."""
    err = (w - grid.dequantize(grid.codes(w))).double()
    return (err * err) @ diag.double()


def _best_candidates(w: torch.Tensor, d: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, maxq: int,
                     sym: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row the smallest weighted error over the candidate grids ``scales``/``zeros`` (candidates, rows), the
    candidate that has it (the first of equal errors) and the first candidate's error, in chunks of
    :data:`SEARCH_CHUNK_ELEMENTS`."""
    import torch

    n, (rows, cols) = scales.shape[0], w.shape
    best = torch.full((rows,), float("inf"), device=w.device)
    choice = torch.zeros(rows, dtype=torch.long, device=w.device)
    per_chunk = min(n, max(1, SEARCH_CHUNK_ELEMENTS // max(1, rows * cols)))
    buffer = torch.empty((per_chunk, rows, cols), device=w.device)  # one work buffer, every step in place
    for start in range(0, n, per_chunk):
        s, z = scales[start : start + per_chunk, :, None], zeros[start : start + per_chunk, :, None]
        t = buffer[: s.shape[0]]
        torch.div(w, s, out=t)  # the codes as Grid.codes computes them, with the zero taken out: exact in float32
        t.round_()
        if sym:
            t.clamp_(-float(zeros[0, 0]), maxq - float(zeros[0, 0]))
        else:
            torch.clamp(t, -z, maxq - z, out=t)
        t.mul_(s).sub_(w).square_()
        err = t @ d  # (chunk, rows)
        if start == 0:
            first = err[0].clone()
        low, at = err.min(dim=0)
        better = low < best
        best = torch.where(better, low, best)
        choice = torch.where(better, at + start, choice)
    return best, choice, first


def search_grid(w: torch.Tensor, bits: int, sym: bool, diag: torch.Tensor, min_shrink: float = MSE_MIN_SHRINK,
                steps: int = MSE_STEPS, stride: int = SEARCH_STRIDE) -> Grid:
    """The grid of ``w`` (rows, cols) whose per-row error weighted by ``diag`` (cols,) is smallest among the
    min/max ranges shrunk by :func:`shrink_factors`. Coarse to fine: every ``stride``-th factor first (1 and
    ``min_shrink`` among them), then for each row the factors within ``stride - 1`` of its best; all of a pass's
    candidates are scored at once. Rows whose best error is not below min/max's keep the min/max grid."""
    import torch

    maxq = (1 << bits) - 1
    w = w.contiguous()  # the column loop hands a transposed view: scored row-major, the search is 1.6x faster
    rows = w.shape[0]
    p = shrink_factors(min_shrink, steps).to(device=w.device, dtype=torch.float32)
    xmin, xmax = _range(w)
    scales, zeros = _scale_zero(p[:, None] * xmin, p[:, None] * xmax, maxq, sym)  # (candidates, rows)
    d = diag.to(device=w.device, dtype=torch.float32)
    coarse = torch.arange(0, p.numel(), max(1, stride), device=w.device)
    if int(coarse[-1]) != p.numel() - 1:
        coarse = torch.cat((coarse, torch.tensor([p.numel() - 1], device=w.device)))
    best, at, base = _best_candidates(w, d, scales[coarse], zeros[coarse], maxq, sym)  # base: min/max's error
    choice = coarse[at]
    if stride > 1:
        offsets = torch.cat((torch.arange(-stride + 1, 0), torch.arange(1, stride))).to(w.device)
        near = (choice[None, :] + offsets[:, None]).clamp(0, p.numel() - 1)  # (2·stride - 2, rows)
        fine, at, _ = _best_candidates(w, d, scales.gather(0, near), zeros.gather(0, near), maxq, sym)
        better = fine < best
        choice = torch.where(better, near.gather(0, at[None, :])[0], choice)
        best = torch.where(better, fine, best)
    rows_index = torch.arange(rows, device=w.device)
    minmax = Grid(scales[0], zeros[0], maxq)
    found = Grid(scales[choice, rows_index], zeros[choice, rows_index], maxq)
    # the float32 scores decided; where they are within rounding of min/max's, float64 has the last word (a near tie
    # it says is worse keeps min/max), so the search is never worse than min/max on the objective
    close = ((choice != 0) & (base - best <= CLOSE_CALL * base)).nonzero()[:, 0]
    if close.numel():
        rows_w = w[close]
        worse = (grid_objective(rows_w, Grid(found.scale[close], found.zero[close], maxq), d)
                 > grid_objective(rows_w, Grid(minmax.scale[close], minmax.zero[close], maxq), d))
        choice[close[worse]] = 0
        found = Grid(scales[choice, rows_index], zeros[choice, rows_index], maxq)
    return found


GRIDS: dict[str, GridChooser] = {
    "minmax": lambda w, bits, sym, diag, options: find_grid(w, bits, sym),
    "mse": lambda w, bits, sym, diag, options: search_grid(w, bits, sym, diag, options.min_shrink, options.steps,
                                                           options.stride),
}


def choose_grid(w: torch.Tensor, bits: int, sym: bool, diag: torch.Tensor, options: GridOptions) -> Grid:
    """The grid of ``w`` (rows, cols) as ``options.grid`` chooses it; ``diag`` is H's diagonal of those columns."""
    return GRIDS[options.grid](w, bits, sym, diag, options)
