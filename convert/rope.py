"""RoPE scaling methods that ``quantmill bake`` writes into a checkpoint's config.json.

Each method is one small class in a registry. Given the model's unscaled RoPE
(base ``rope_theta``, rotary head dim), the extension factor, the original context
and optional method parameters, it returns a ``RopeBake``: the config.json fields
(``rope_parameters`` as transformers 5 writes it, legacy ``rope_theta`` /
``rope_scaling`` for older readers, ``max_position_embeddings``) and the GGUF keys
the HF → GGUF converter derives from them (``{arch}`` stands for the GGUF
architecture name), so a release records what each runtime is meant to run.

NTK-YaRN (LightOn's method for Alfred-40B-1023): for extension factor s, rotary
dim D and base b, the new base is b·(s+1)^(D/(D−2)) and queries and keys are each
scaled by m = 1 + 0.1·ln s. Transformers runs it as YaRN with factor 1 (no
interpolation) and ``attention_factor`` m; llama.cpp as unscaled RoPE with
``rope.scaling.attn_factor`` m, which every architecture reads and multiplies into
the rotation's cos/sin (llama.cpp ``hparams.rope_attn_factor``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from quantmill.errors import UnsupportedError, UserInputError

MAX_CONTEXT = 1 << 24  # the largest max_position_embeddings quantmill accepts (convert.arch.fields.CONTEXT)


@dataclass(frozen=True)
class RopeBase:
    """The unscaled RoPE of a checkpoint and the requested extension."""

    rope_theta: float
    rotary_dim: int
    factor: float
    original_context: int


@dataclass(frozen=True)
class RopeBake:
    """What baking one method changes: config.json fields and the GGUF keys they become."""

    rope_parameters: dict[str, Any]
    max_position_embeddings: int
    gguf_keys: dict[str, Any]
    gguf_tensors: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    legacy_rope_scaling: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        legacy = {k: v for k, v in self.rope_parameters.items() if k not in ("rope_theta", "rope_type")}
        object.__setattr__(self, "legacy_rope_scaling", {"type": self.rope_parameters["rope_type"], **legacy})

    def config_updates(self) -> dict[str, Any]:
        """The config.json fields to set (both the transformers 5 and the legacy spelling)."""
        return {
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": dict(self.rope_parameters),
            "rope_scaling": dict(self.legacy_rope_scaling),
            "rope_theta": self.rope_parameters["rope_theta"],
        }


class RopeMethod:
    """One RoPE scaling method. Subclasses register themselves under ``name``."""

    name: ClassVar[str]
    # Method parameters the user may override, with their defaults.
    defaults: ClassVar[dict[str, float]] = {}
    registry: ClassVar[dict[str, type[RopeMethod]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        RopeMethod.registry[cls.name] = cls

    def check_factor(self, factor: float) -> None:
        if factor < 1:
            raise UserInputError(f"--rope-factor {factor:g}: {self.name} extends the context, so the factor must be at least 1")

    def new_context(self, base: RopeBase) -> int:
        context = base.original_context * base.factor
        if not math.isfinite(context) or context > MAX_CONTEXT:
            raise UserInputError(
                f"--rope-factor {base.factor:g}: {base.original_context} x {base.factor:g} tokens is beyond any context "
                f"a runtime supports (at most {MAX_CONTEXT}); pass a realistic factor such as 4 or 8")
        return int(round(context))

    def bake(self, base: RopeBase, params: dict[str, float]) -> RopeBake:
        raise NotImplementedError


def _common_keys(theta: float, context: int) -> dict[str, Any]:
    return {"{arch}.context_length": context, "{arch}.rope.freq_base": theta}


class LinearRope(RopeMethod):
    """Position interpolation: every frequency divided by the factor."""

    name = "linear"

    def bake(self, base: RopeBase, params: dict[str, float]) -> RopeBake:
        ctx = self.new_context(base)
        return RopeBake(
            {"rope_type": "linear", "factor": base.factor, "rope_theta": base.rope_theta},
            ctx,
            {**_common_keys(base.rope_theta, ctx), "{arch}.rope.scaling.type": "linear", "{arch}.rope.scaling.factor": base.factor},
        )


class DynamicNtkRope(RopeMethod):
    """Dynamic NTK: the base grows with the sequence length once it passes the original context.

    Transformers takes ``max_position_embeddings`` as the original context, so it stays.
    llama.cpp has no dynamic RoPE: its GGUF runs unscaled RoPE.
    """

    name = "dynamic"

    def new_context(self, base: RopeBase) -> int:
        return base.original_context

    def bake(self, base: RopeBase, params: dict[str, float]) -> RopeBake:
        ctx = self.new_context(base)
        note = (
            "llama.cpp has no dynamic NTK RoPE: the GGUF runs unscaled RoPE (identical up to the original "
            "context); past it, pass rope_freq_base = b·(s·L/L0 − s + 1)^(D/(D−2)) for sequence length L"
        )
        return RopeBake({"rope_type": "dynamic", "factor": base.factor, "rope_theta": base.rope_theta}, ctx,
                        _common_keys(base.rope_theta, ctx), notes=(note,))


class YarnRope(RopeMethod):
    """YaRN: NTK-by-parts interpolation between beta_fast and beta_slow rotations, plus 0.1·ln s + 1 attention scaling."""

    name = "yarn"
    # beta_fast/beta_slow stay at their defaults (32, 1): llama.cpp's llama architecture
    # does not read the rope.scaling.yarn_beta_* keys, so other values would not carry over.

    def bake(self, base: RopeBase, params: dict[str, float]) -> RopeBake:
        ctx = self.new_context(base)
        rope = {
            "rope_type": "yarn",
            "factor": base.factor,
            "original_max_position_embeddings": base.original_context,
            "rope_theta": base.rope_theta,
        }
        keys = {
            **_common_keys(base.rope_theta, ctx),
            "{arch}.rope.scaling.type": "yarn",
            "{arch}.rope.scaling.factor": base.factor,
            "{arch}.rope.scaling.original_context_length": base.original_context,
        }
        return RopeBake(rope, ctx, keys)


class Llama3Rope(RopeMethod):
    """Llama 3.1: low frequencies divided by the factor, high ones kept, a smooth ramp between.

    In GGUF it is the generated ``rope_freqs`` tensor (per-frequency divisors), not keys.
    """

    name = "llama3"
    defaults = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}

    def bake(self, base: RopeBase, params: dict[str, float]) -> RopeBake:
        if params["high_freq_factor"] <= params["low_freq_factor"]:
            raise UserInputError("--rope-param: llama3 needs high_freq_factor > low_freq_factor")
        ctx = self.new_context(base)
        rope = {
            "rope_type": "llama3",
            "factor": base.factor,
            "original_max_position_embeddings": base.original_context,
            "rope_theta": base.rope_theta,
            **params,
        }
        return RopeBake(rope, ctx, _common_keys(base.rope_theta, ctx), gguf_tensors=("rope_freqs.weight",))


class NtkYarnRope(RopeMethod):
    """NTK-YaRN (LightOn, Alfred-40B-1023): base b·(s+1)^(D/(D−2)), q and k scaled by 1 + 0.1·ln s."""

    name = "ntk-yarn"

    def check_factor(self, factor: float) -> None:
        if factor <= 1:
            raise UserInputError(f"--rope-factor {factor:g}: ntk-yarn needs an extension factor s > 1 (it scales by 1 + 0.1·ln s)")

    @staticmethod
    def new_base(base: RopeBase) -> float:
        return base.rope_theta * (base.factor + 1) ** (base.rotary_dim / (base.rotary_dim - 2))

    @staticmethod
    def attention_factor(factor: float) -> float:
        return 1 + 0.1 * math.log(factor)

    def bake(self, base: RopeBase, params: dict[str, float]) -> RopeBake:
        if base.rotary_dim <= 2:
            raise UserInputError(f"ntk-yarn needs a rotary dimension above 2, the model has {base.rotary_dim}")
        ctx = self.new_context(base)
        theta, m = self.new_base(base), self.attention_factor(base.factor)
        rope = {
            "rope_type": "yarn",
            "factor": 1.0,
            "attention_factor": m,
            "original_max_position_embeddings": ctx,
            "rope_theta": theta,
        }
        keys = {**_common_keys(theta, ctx), "{arch}.rope.scaling.type": "none", "{arch}.rope.scaling.attn_factor": m}
        return RopeBake(rope, ctx, keys)


def rope_methods() -> list[str]:
    return sorted(RopeMethod.registry)


def get_rope_method(name: str) -> RopeMethod:
    cls = RopeMethod.registry.get(name)
    if cls is None:
        raise UnsupportedError(f"--rope {name!r} is not a known RoPE method; use one of {', '.join(rope_methods())}")
    return cls()


def parse_rope_factor(value: object) -> float:
    """The extension factor as a finite positive float, or a UserInputError naming the flag."""
    if isinstance(value, bool):
        raise UserInputError(f"--rope-factor {value!r} is not a number; pass e.g. --rope-factor 4")
    try:
        factor = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UserInputError(f"--rope-factor {value!r} is not a number; pass e.g. --rope-factor 4") from None
    if not math.isfinite(factor) or factor <= 0:
        raise UserInputError(f"--rope-factor {value!r} must be a finite number above 0; pass e.g. --rope-factor 4")
    return factor


def resolve_params(method: RopeMethod, overrides: dict[str, float] | None) -> dict[str, float]:
    """The method's defaults updated with the user's overrides (unknown keys refused)."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(method.defaults))
    if unknown:
        valid = ", ".join(sorted(method.defaults)) or "none"
        raise UserInputError(f"--rope-param {unknown[0]!r} is not a parameter of {method.name}; valid: {valid}")
    params = {**method.defaults, **overrides}
    for key, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserInputError(f"--rope-param {key}={value!r} must be a finite number")
    return {key: float(params[key]) for key in sorted(params)}


def bake_rope_config(
    method_name: str, base: RopeBase, params: dict[str, float] | None = None
) -> RopeBake:
    """Validate the request and return what baking ``method_name`` writes."""
    method = get_rope_method(method_name)
    parse_rope_factor(base.factor)
    method.check_factor(base.factor)
    if base.original_context <= 0:
        raise UserInputError(f"--original-context {base.original_context} must be a positive number of tokens")
    return method.bake(base, resolve_params(method, params))
