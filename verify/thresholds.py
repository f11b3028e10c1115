"""The parity verdict: per quant type, how far an artifact may drift from the fp16 reference.

An artifact passes when its mean KL divergence, its top-1 agreement and its perplexity change
are all within its type's row. The table is data; users override any cell (``--threshold
Q4_K_M:max_kld_mean=0.2``) or the whole table (``--thresholds FILE.json``, the same shape as
:data:`DEFAULT_THRESHOLDS`). A type without a row gets the ``*`` row.

How the defaults were chosen: about 2.5–3 times what each type costs SmolLM2-135M-Instruct
(BENCHMARKS.md, "Verify"; e.g. Q8_0: mean KLD 0.0039, same top 95.9 %; Q4_K_M: 0.051, 85.5 %;
Q5_K_M: 0.075, 83.3 %, worse than Q4_K_M there because its 576-wide rows push libllama to
Q5_1 fallbacks). A model that small suffers more from quantization than the 7B+ models these
types usually serve, so healthy artifacts pass with room to spare, while a broken one (wrong
tokenizer, swapped tensors, a bad imatrix, a GPTQ branch packed wrongly) misses by far.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from quantmill.errors import InputFileError, UserInputError
from quantmill.jsonio import read_json_object

# names that were renamed (issue 13: one name per metric, the one verify reports)
RENAMED = {"max_kl_divergence": "max_kld_mean", "kld_mean": "max_kld_mean", "top1": "min_top1_agreement",
           "delta_ppl_pct": "max_delta_ppl_pct"}


class Threshold(BaseModel):
    """Limits for one artifact (inclusive): ``max_<metric>`` / ``min_<metric>``; None switches a check off.

    The metric names are verify's own (``kld_mean``, ``top1_agreement``, ``delta_ppl_pct``); the
    recipe's ``verify.thresholds`` are this model too.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_kld_mean: float | None = Field(default=None, ge=0.0)  # nats per token
    min_top1_agreement: float | None = Field(default=None, ge=0.0, le=1.0)  # fraction
    max_delta_ppl_pct: float | None = Field(default=None, ge=0.0)  # perplexity increase, percent

    def failures(self, figures: Mapping[str, float | None]) -> list[str]:
        """What the figures break, in words (empty for none); NaN and missing figures fail a set limit."""
        broken = []
        for field, limit in self:
            if limit is None:
                continue
            bound, metric = field.split("_", 1)
            value = math.nan if (found := figures.get(metric)) is None else float(found)
            op = "<=" if bound == "max" else ">="
            if not (math.isfinite(value) and (value <= limit if op == "<=" else value >= limit)):
                broken.append(f"{metric} {value:.4g} (limit {op} {limit:g})")
        return broken

    def stricter(self, other: Threshold) -> Threshold:
        """Both sets of limits at once: the tighter bound of each metric."""
        cells = {field: [v for v in (mine, getattr(other, field)) if v is not None] for field, mine in self}
        return Threshold(**{f: (min if f.startswith("max_") else max)(v) if v else None for f, v in cells.items()})


FIELDS = tuple(Threshold.model_fields)


def _row(kld: float, top1: float, delta: float) -> Threshold:
    return Threshold(max_kld_mean=kld, min_top1_agreement=top1, max_delta_ppl_pct=delta)


# quant type → limits (max mean KLD, min top-1 agreement, max Δppl %). Types are GGUF file types, F16/BF16/F32
# checkpoints, and GPTQ-<bits>bit.
DEFAULT_THRESHOLDS: dict[str, Threshold] = {
    "F32": _row(0.001, 0.99, 0.5),
    "F16": _row(0.001, 0.99, 0.5),
    "BF16": _row(0.005, 0.97, 1.0),
    "Q8_0": _row(0.012, 0.90, 2.0),
    "GPTQ-8bit": _row(0.012, 0.90, 2.0),
    "Q6_K": _row(0.03, 0.85, 5.0),
    **dict.fromkeys(("Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0", "IQ4_XS", "IQ4_NL"),
                    _row(0.2, 0.6, 25.0)),
    **dict.fromkeys(("Q3_K_L", "Q3_K_M", "Q3_K_S", "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS"), _row(0.5, 0.5, 60.0)),
    **dict.fromkeys(("Q2_K", "Q2_K_S", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS"), _row(1.5, 0.35, 200.0)),
    # GPTQ at 4 bits per weight is far coarser than the K-quant mixes above (6.2 bpw on SmolLM2):
    # measured there at group 64 with act-order, 4-bit: KLD 0.20, same top 76 %, Δppl +23 %;
    # 3-bit: KLD 0.85, same top 51 %, Δppl +139 %.
    "GPTQ-4bit": _row(0.6, 0.4, 70.0),
    "GPTQ-3bit": _row(2.5, 0.25, 400.0),
    "GPTQ-2bit": _row(5.0, 0.15, 1500.0),  # not measured: a sanity bound only
    "*": _row(1.5, 0.35, 200.0),
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
        hint = f" ({unknown[0]!r} is now called {RENAMED[unknown[0]]!r})" if unknown[0] in RENAMED else ""
        raise UserInputError(f"{where}: unknown field {unknown[0]!r}{hint}; use {', '.join(FIELDS)}")
    base = table.get(quant_type) or table["*"]
    table[quant_type] = base.model_copy(update={k: _number(v, f"{where} {k}") for k, v in cells.items()})


def parse_threshold_option(option: str) -> tuple[str, dict[str, str]]:
    """``TYPE:field=value[,field=value…]`` → (type, {field: value})."""
    quant_type, sep, rest = option.partition(":")
    pairs = [p for p in rest.split(",") if p.strip()]
    if not sep or not quant_type.strip() or not pairs or any("=" not in p for p in pairs):
        raise UserInputError(f"--threshold {option!r}: write TYPE:FIELD=VALUE[,FIELD=VALUE], e.g. Q4_K_M:max_kld_mean=0.2")
    return quant_type.strip().upper(), {k.strip(): v.strip() for k, v in (p.split("=", 1) for p in pairs)}


def load_thresholds(path: Path | None = None, overrides: Iterable[str] = ()) -> dict[str, Threshold]:
    """The default table, then a JSON file's rows, then ``--threshold`` options, in that order."""
    table = dict(DEFAULT_THRESHOLDS)
    if path is not None:
        example = 'write {"Q4_K_M": {"max_kld_mean": 0.2}, ...}'
        data = read_json_object(Path(path), example)
        if not all(isinstance(v, dict) for v in data.values()):
            raise InputFileError(path, "must map quant types to objects of limits", example)
        for quant_type, cells in sorted(data.items()):
            _apply(table, str(quant_type).upper(), cells, f"{path}: {quant_type}")
    for option in overrides:
        quant_type, cells = parse_threshold_option(option)
        _apply(table, quant_type, cells, f"--threshold {option!r}")
    return table
