"""The architecture records: one module per model family, each registered (:mod:`.registry`) by the
plain import below, which is the whole list of families (order does not matter; duplicates raise).
"""
from __future__ import annotations

from quantmill.convert.arch import falcon, lckv, llama, qwen  # noqa: F401  (registers the families)
from quantmill.convert.arch.base import (
    CAPABILITIES,
    Architecture,
    DecoderSpec,
    GgufToHfSpec,
    HParams,
    PreNormLayout,
    RowTransform,
)
from quantmill.convert.arch.registry import families, for_config, for_gguf, register, resolve, supported_architectures

__all__ = [
    "CAPABILITIES", "Architecture", "DecoderSpec", "GgufToHfSpec", "HParams", "PreNormLayout", "RowTransform",
    "families", "for_config", "for_gguf", "register", "resolve", "supported_architectures",
]
