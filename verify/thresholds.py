"""The parity verdict: per quant type, how far an artifact may drift from the fp16 reference.

An artifact passes when its mean KL divergence, its top-1 agreement and its perplexity change
are all within its type's row. The table is data; users override any cell (``--threshold
Q4_K_M:kld_mean=0.2``) or the whole table (``--thresholds FILE.json``, the same shape as
:data:`DEFAULT_THRESHOLDS`). A type without a row gets the ``*`` row.

How the defaults were chosen: about 2.5–3 times what each type costs SmolLM2-135M-Instruct
(BENCHMARKS.md, "Verify"; e.g. Q8_0: mean KLD 0.0039, same top 95.9 %; Q4_K_M: 0.051, 85.5 %;
Q5_K_M: 0.075, 83.3 %, worse than Q4_K_M there because its 576-wide rows push libllama to
Q5_1 fallbacks). A model that small suffers more from quantization than the 7B+ models these
types usually serve, so healthy artifacts pass with room to spare, while a broken one (wrong
tokenizer, swapped tensors, a bad imatrix, a GPTQ branch packed wrongly) misses by far.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from quantmill.errors import InputFileError, UserInputError


@dataclass(frozen=True)
class Threshold:
    """Limits for one quant type (inclusive)."""

    kld_mean: float  # maximum mean KL divergence (nats per token)
    top1: float  # minimum top-1 agreement (fraction)
    delta_ppl_pct: float  # maximum perplexity increase, percent

    def failures(self, figures: Mapping[str, float]) -> list[str]:
        """What the figures break, in words ('' for none); NaN and missing figures fail."""
        checks = (
            ("kld_mean", figures.get("kld_mean", math.nan), "<=", self.kld_mean),
            ("top1", figures.get("top1_agreement", math.nan), ">=", self.top1),
            ("delta_ppl_pct", figures.get("delta_ppl_pct", math.nan), "<=", self.delta_ppl_pct),
        )
        broken = []
        for name, value, op, limit in checks:
            ok = value <= limit if op == "<=" else value >= limit
            if not (math.isfinite(value) and ok):
                broken.append(f"{name} {value:.4g} (limit {op} {limit:g})")
        return broken


FIELDS = tuple(f.name for f in fields(Threshold))

# quant type → limits. Types are GGUF file types, F16/BF16/F32 checkpoints, and GPTQ-<bits>bit.
DEFAULT_THRESHOLDS: dict[str, Threshold] = {
    "F32": Threshold(kld_mean=0.001, top1=0.99, delta_ppl_pct=0.5),
    "F16": Threshold(kld_mean=0.001, top1=0.99, delta_ppl_pct=0.5),
    "BF16": Threshold(kld_mean=0.005, top1=0.97, delta_ppl_pct=1.0),
    "Q8_0": Threshold(kld_mean=0.012, top1=0.90, delta_ppl_pct=2.0),
    "GPTQ-8bit": Threshold(kld_mean=0.012, top1=0.90, delta_ppl_pct=2.0),
    "Q6_K": Threshold(kld_mean=0.03, top1=0.85, delta_ppl_pct=5.0),
    **dict.fromkeys(("Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0", "IQ4_XS", "IQ4_NL"),
                   Threshold(kld_mean=0.2, top1=0.6, delta_ppl_pct=25.0)),
    **dict.fromkeys(("Q3_K_L", "Q3_K_M", "Q3_K_S", "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS"),
                    Threshold(kld_mean=0.5, top1=0.5, delta_ppl_pct=60.0)),
    **dict.fromkeys(("Q2_K", "Q2_K_S", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS"),
                    Threshold(kld_mean=1.5, top1=0.35, delta_ppl_pct=200.0)),
    # GPTQ at 4 bits per weight is far coarser than the K-quant mixes above (6.2 bpw on SmolLM2):
    # measured there at group 64 with act-order, 4-bit: KLD 0.20, same top 76 %, Δppl +23 %;
    # 3-bit: KLD 0.85, same top 51 %, Δppl +139 %.
    "GPTQ-4bit": Threshold(kld_mean=0.6, top1=0.4, delta_ppl_pct=70.0),
    "GPTQ-3bit": Threshold(kld_mean=2.5, top1=0.25, delta_ppl_pct=400.0),
    "GPTQ-2bit": Threshold(kld_mean=5.0, top1=0.15, delta_ppl_pct=1500.0),  # not measured: a sanity bound only
    "*": Threshold(kld_mean=1.5, top1=0.35, delta_ppl_pct=200.0),
}


def threshold_for(quant_type: str, table: Mapping[str, Threshold]) -> Threshold:
    """The row of ``quant_type``, else the ``*`` row."""
    return table.get(quant_type) or table["*"]


def _number(value: Any, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserInputError(f"{where}: {value!r} is not a number; give a decimal such as 0.05") from None
    if not math.isfinite(number) or number < 0:
        raise UserInputError(f"{where}: {value!r} must be a finite number ≥ 0")
    return number


def _apply(table: dict[str, Threshold], quant_type: str, cells: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(cells) - set(FIELDS))
    if unknown:
        raise UserInputError(f"{where}: unknown field {unknown[0]!r}; use {', '.join(FIELDS)}")
    base = table.get(quant_type) or table["*"]
    table[quant_type] = replace(base, **{k: _number(v, f"{where} {k}") for k, v in cells.items()})


def parse_threshold_option(option: str) -> tuple[str, dict[str, str]]:
    """``TYPE:field=value[,field=value…]`` → (type, {field: value})."""
    quant_type, sep, rest = option.partition(":")
    pairs = [p for p in rest.split(",") if p.strip()]
    if not sep or not quant_type.strip() or not pairs or any("=" not in p for p in pairs):
        raise UserInputError(f"--threshold {option!r}: write TYPE:FIELD=VALUE[,FIELD=VALUE], e.g. Q4_K_M:kld_mean=0.2")
    return quant_type.strip().upper(), {k.strip(): v.strip() for k, v in (p.split("=", 1) for p in pairs)}


def load_thresholds(path: Path | None = None, overrides: Iterable[str] = ()) -> dict[str, Threshold]:
    """The default table, then a JSON file's rows, then ``--threshold`` options, in that order."""
    table = dict(DEFAULT_THRESHOLDS)
    if path is not None:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputFileError(path, f"cannot be read as JSON ({exc})", 'write {"Q4_K_M": {"kld_mean": 0.2}, ...}') from exc
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise InputFileError(path, "must map quant types to objects of limits", 'write {"Q4_K_M": {"kld_mean": 0.2}}')
        for quant_type, cells in sorted(data.items()):
            _apply(table, str(quant_type).upper(), cells, f"{path}: {quant_type}")
    for option in overrides:
        quant_type, cells = parse_threshold_option(option)
        _apply(table, quant_type, cells, f"--threshold {option!r}")
    return table
