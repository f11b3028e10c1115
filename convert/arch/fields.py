"""config.json field checks shared by every architecture record: type and range, with sane upper bounds.

A record's ``read_hparams`` calls :func:`check_fields` on the config (its defaults filled in) and
``check_rope_type`` calls :func:`check_rope` on the RoPE parameters, so a field that cannot be
right (``num_hidden_layers: 1000000000000``, ``rms_norm_eps: "abc"``, ``max_position_embeddings: -1``,
a NaN ``rope_theta``) is refused at once, in one line naming the field, before anything is
allocated or written. Absent and ``null`` fields are left to the record (required fields and
defaults are its business); present ones must be in range.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantmill.convert.rope import MAX_CONTEXT
from quantmill.errors import InputFileError

FIX = "fix config.json"


@dataclass(frozen=True)
class Int:
    """An integer in [low, high] (booleans and floats refused)."""

    low: int
    high: int

    def problem(self, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or not self.low <= value <= self.high:
            return f"expected an integer in [{self.low}, {self.high}]"
        return None


@dataclass(frozen=True)
class Real:
    """A finite number with low < value (< high when high is set); ``low_closed`` allows value == low."""

    low: float
    high: float | None = None
    low_closed: bool = False

    def problem(self, value: Any) -> str | None:
        upper = f", {self.high})" if self.high is not None else ", ∞)"
        wanted = f"expected a finite number in {'[' if self.low_closed else '('}{self.low:g}{upper}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return wanted
        number = float(value)
        if not math.isfinite(number) or number < self.low or (number == self.low and not self.low_closed):
            return wanted
        if self.high is not None and number >= self.high:
            return wanted
        return None


COUNT = Int(1, 1024)  # layers, heads
WIDTH = Int(1, 1 << 16)  # hidden size, head dim
CONTEXT = Int(1, MAX_CONTEXT)
EPS = Real(0.0, 1.0)
POSITIVE = Real(0.0)

# Every config.json field quantmill reads, by name (RefinedWeb spellings included).
FIELD_RULES: dict[str, Int | Real] = {
    "num_hidden_layers": COUNT, "n_layer": COUNT,
    "num_attention_heads": COUNT, "n_head": COUNT,
    "num_key_value_heads": COUNT, "num_kv_heads": COUNT, "n_head_kv": COUNT,
    "hidden_size": WIDTH, "n_embed": WIDTH, "head_dim": WIDTH,
    "intermediate_size": Int(1, 1 << 20), "ffn_hidden_size": Int(1, 1 << 20),
    "vocab_size": Int(1, 1 << 22),
    "max_position_embeddings": CONTEXT, "original_max_position_embeddings": CONTEXT,
    "rms_norm_eps": EPS, "norm_eps": EPS, "layer_norm_eps": EPS, "layer_norm_epsilon": EPS, "norm_epsilon": EPS,
    "rope_theta": POSITIVE, "rotary_emb_base": POSITIVE, "ntk_scaling_factor": POSITIVE,
}
# RoPE parameters (``rope_parameters`` / ``rope_scaling``): every number finite, the scales positive.
ROPE_RULES: dict[str, Int | Real] = {
    "rope_theta": POSITIVE, "factor": POSITIVE, "low_freq_factor": POSITIVE, "high_freq_factor": POSITIVE,
    "attention_factor": POSITIVE, "attn_factor": POSITIVE, "extrapolation_factor": Real(0.0, low_closed=True),
    "beta_fast": POSITIVE, "beta_slow": POSITIVE, "mscale": POSITIVE, "mscale_all_dim": Real(0.0, low_closed=True),
    "original_max_position_embeddings": CONTEXT,
}
ROPE_LISTS = ("short_factor", "long_factor")


def _refuse(config_path: Path, field: str, value: Any, wanted: str) -> InputFileError:
    shown = repr(value)
    return InputFileError(config_path, f"field {field!r} is {shown[:60]}{'…' if len(shown) > 60 else ''}, {wanted}", FIX)


def check_fields(config: Mapping[str, Any], config_path: Path, required: tuple[str, ...] = ()) -> None:
    """Refuse a present, non-null config field of the wrong type or out of range, naming it, and a ``required``
    field that is not a positive integer."""
    for field, rule in FIELD_RULES.items():
        value = config.get(field)
        if value is not None and (problem := rule.problem(value)) is not None:
            raise _refuse(config_path, field, value, problem)
    for field in required:
        value = config.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise _refuse(config_path, field, value, "expected a positive integer")
    for key in ("rope_scaling", "rope_parameters"):
        value = config.get(key)
        if value is not None and not isinstance(value, dict):
            raise _refuse(config_path, key, value, "expected an object")
        if isinstance(value, dict):
            check_rope(value, config_path, key)


def check_rope(rope: Mapping[str, Any], config_path: Path, prefix: str = "rope_parameters") -> None:
    """Every RoPE number finite and in range (a NaN/Inf ``rope_theta`` or factor never reaches a file)."""
    for field, rule in ROPE_RULES.items():
        value = rope.get(field)
        if value is not None and (problem := rule.problem(value)) is not None:
            raise _refuse(config_path, f"{prefix}.{field}" if field != "rope_theta" else "rope_theta", value, problem)
    for field in ROPE_LISTS:
        value = rope.get(field)
        if value is None:
            continue
        if not isinstance(value, list) or not all(POSITIVE.problem(v) is None for v in value):
            raise _refuse(config_path, f"{prefix}.{field}", value, "expected a list of finite positive numbers")
