"""The stage registry: one record per stage kind (:class:`~quantmill.pipeline.context.StageKind`), one module each.

The imports below are the whole list of kinds; a kind registered twice raises.
"""
from __future__ import annotations

from typing import Any

from quantmill.pipeline.context import StageKind
from quantmill.pipeline.stages import (
    bake,
    calibrate,
    gguf,
    gguf_base,
    gguf_mix,
    gptq,
    imatrix,
    merge,
    release,
    source,
    verify,
)

STAGES: dict[str, StageKind[Any]] = {}
for _record in (source.KIND, merge.KIND, bake.KIND, calibrate.KIND, imatrix.KIND, gptq.KIND, gguf_base.KIND, gguf.KIND,
                gguf_mix.KIND, verify.KIND, release.KIND):
    if _record.name in STAGES:
        raise ValueError(f"stage kind {_record.name!r} is registered twice")
    STAGES[_record.name] = _record
