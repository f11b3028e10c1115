"""GGUF file naming: ``Name-SizeLabel-Finetune-Version-TYPE.gguf`` and the size label.

Follows the GGUF naming convention documented in ggml's ``docs/gguf.md``: the size
label is the parameter count in K/M/B/T with at least two significant digits
(``135M``, ``1.1B``, ``7B``), ``8x7B`` for mixtures of experts; missing parts are
left out; spaces become dashes.
"""
from __future__ import annotations

from dataclasses import dataclass

# (threshold, divisor, suffix): a count strictly above the threshold uses that unit.
_UNITS: tuple[tuple[float, float, str], ...] = (
    (1e12, 1e12, "T"),
    (1e9, 1e9, "B"),
    (1e6, 1e6, "M"),
    (0.0, 1e3, "K"),
)


def rounded_count(n_params: int, min_digits: int = 2) -> str:
    """``135M``, ``1.1B``, ``3.2M``: the count in the largest unit it exceeds, at least ``min_digits`` digits."""
    for threshold, divisor, suffix in _UNITS:
        if n_params > threshold or suffix == "K":
            scaled = n_params / divisor
            break
    integer_digits = len(str(round(scaled)).lstrip("0"))
    decimals = max(min_digits - integer_digits, 0)
    return f"{scaled:.{decimals}f}{suffix}"


def size_label(total_params: int, shared_params: int = 0, expert_params: int = 0, expert_count: int = 0) -> str:
    """The size label: ``7B``, or ``8x7B`` style when the model has experts."""
    if expert_count > 0:
        return f"{expert_count}x{rounded_count(abs(shared_params) + abs(expert_params))}"
    return rounded_count(abs(total_params))


def _part(value: str | None, upper: bool = False) -> str:
    if value is None:
        return ""
    text = value.strip().replace(" ", "-")
    return "-" + (text.upper() if upper else text)


@dataclass(frozen=True)
class ModelNaming:
    """The parts of a standard GGUF file name."""

    name: str | None = None
    basename: str | None = None
    size_label: str | None = None
    finetune: str | None = None
    version: str | None = None

    def stem(self, output_type: str | None) -> str:
        base = self.basename if self.basename is not None else self.name
        head = base.strip().replace(" ", "-").replace("/", "-") if base is not None else "ggml-model"
        return head + _part(self.size_label) + _part(self.finetune) + _part(self.version) + _part(output_type, upper=True)

    def file_name(self, output_type: str | None) -> str:
        return f"{self.stem(output_type)}.gguf"

