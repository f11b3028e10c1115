"""XᵀX for GPTQ, accumulated on the lower block triangle only: about 56% of the work of a full product.

XᵀX is symmetric, so with the columns cut into ``BLOCKS`` slices, row slice i needs only
columns ``[0, end_i)``: one matrix product per slice. ``matrix()`` mirrors the lower triangle
into the upper one. Same interface as :class:`quantmill.quantize.stats.Hessian` (which the
statistics pass uses), whose ``xtx`` here holds the lower block triangle.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from quantmill.quantize.stats import Hessian

if TYPE_CHECKING:
    import torch

BLOCKS = 8


@dataclass
class BlockedHessian(Hessian):
    @classmethod
    def create(cls, in_features: int, device: torch.device) -> BlockedHessian:
        import torch

        return cls(torch.zeros(in_features, in_features, dtype=torch.float32, device=device))

    def add(self, x: torch.Tensor) -> None:
        xf = x.float()
        width = xf.shape[1]
        step = -(-width // BLOCKS)
        for start in range(0, width, step):
            stop = min(start + step, width)
            self.xtx[start:stop, :stop].addmm_(xf[:, start:stop].t(), xf[:, :stop])
        self.count += int(x.shape[0])

    def matrix(self) -> torch.Tensor:
        """The full symmetric XᵀX."""
        import torch

        return torch.tril(self.xtx) + torch.tril(self.xtx, -1).t()
