"""The bake stage: RoPE scaling written into the checkpoint's config.json (later into GGUF keys)."""
from __future__ import annotations

from quantmill.pipeline.context import Estimate, StageContext, StageKind, StageParams
from quantmill.quantize.cost import LIGHT_PROCESS_BYTES
from quantmill.recipe import Rope


class BakeParams(StageParams):
    model: str
    rope: Rope


def run(ctx: StageContext, params: BakeParams) -> None:
    from quantmill.convert.bake import bake_rope

    rope = params.rope
    bake_rope(ctx.checkpoint(params.model), rope.method, rope.factor, ctx.model_out, rope.original_context,
              params=rope.params or None)


KIND = StageKind("bake", 1, BakeParams, run, lambda size, p: Estimate.of(size, size.source_bytes, 0.02,
                                                                                 lambda s: LIGHT_PROCESS_BYTES),
                 needs=lambda p: ("bake",))
