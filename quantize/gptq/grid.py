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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FP16_SMALLEST = 2.0**-24  # smallest positive float16 (subnormal); scales never round to zero
FP16_LARGEST = 65504.0


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


def _fp16_exact(values: torch.Tensor) -> torch.Tensor:
    import torch

    return values.clamp(FP16_SMALLEST, FP16_LARGEST).to(torch.float16).to(torch.float32)


def find_grid(w: torch.Tensor, bits: int, sym: bool) -> Grid:
    """The grid for the columns ``w`` (rows, cols) of one group."""
    import torch

    maxq = (1 << bits) - 1
    xmin = torch.clamp(w.min(dim=1).values, max=0.0)
    xmax = torch.clamp(w.max(dim=1).values, min=0.0)
    if sym:
        amax = torch.maximum(xmax, -xmin)
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)
        scale = _fp16_exact(2.0 * amax / maxq)
        zero = torch.full_like(scale, float((maxq + 1) // 2))
        return Grid(scale, zero, maxq)
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -torch.ones_like(xmin), xmin)
    xmax = torch.where(flat, torch.ones_like(xmax), xmax)
    scale = _fp16_exact((xmax - xmin) / maxq)
    zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    low = zero < 1  # v1 cannot store zero 0: keep zero 1 and stretch the scale over max(w)
    if bool(low.any()):
        scale = torch.where(low, _fp16_exact(xmax / (maxq - 1)), scale)
        zero = torch.where(low, torch.ones_like(zero), zero)
    return Grid(scale, zero, maxq)
