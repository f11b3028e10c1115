"""The weight update of one LoRA module, computed in float32 the way PEFT computes it.

Plain LoRA (linear):    W' = W + T(B·A)·s
Plain LoRA (embedding): W' = W + (B·A)ᵀ·s          (A is r × vocab, B is dim × r)
DoRA:                   W' = (m / ‖V‖) · (W + Δ), with V = (W + Δ) seen as (out, in) and the
                        norm taken over the input dimension (one value per output row; for an
                        embedding, per embedding dimension), exactly PEFT's ``get_weight_norm``.
``T`` transposes when the base stores the weight as (in, out) (GPT-2 Conv1D, embeddings).
``s`` is the adapter's scaling times the weight the adapter is applied with.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _oriented(x: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return x.T if fan_in_fan_out else x


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, kind: str, fan_in_fan_out: bool) -> torch.Tensor:
    """B·A·s in the base tensor's stored layout."""
    if kind == "embedding":
        return (b @ a).T * scaling
    return _oriented(b @ a, fan_in_fan_out) * scaling


def dora_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """DoRA's merged weight: the column-normalised W + Δ rescaled by the learned magnitude."""
    import torch

    combined = _oriented(weight, fan_in_fan_out) + _oriented(delta, fan_in_fan_out)
    norm = torch.linalg.norm(combined, dim=1).to(combined.dtype)
    factor = _oriented((magnitude / norm).view(-1, 1), fan_in_fan_out)
    return factor * (weight + delta)


def merged_weight(
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    kind: str,
    fan_in_fan_out: bool,
    magnitude: torch.Tensor | None = None,
) -> torch.Tensor:
    """W' for one module: plain LoRA adds the delta, DoRA rescales W + delta."""
    delta = lora_delta(a, b, scaling, kind, fan_in_fan_out)
    if magnitude is None:
        return weight + delta
    return dora_weight(weight, delta, magnitude, fan_in_fan_out)
