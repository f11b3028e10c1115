"""What a stage function is given: its node, its output directory, the finished directories it reads.

Shared by the stage functions (:mod:`quantmill.pipeline.stages`), the release and verify stages and the
runner; it imports only the plan, so none of them import each other to reach it.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from quantmill.pipeline.plan import Node, Plan


@dataclass(frozen=True)
class StageContext:
    node: Node
    plan: Plan
    out: Path
    inputs: dict[str, Path]  # dependency stage name -> its finished directory
    progress: bool

    @property
    def threads(self) -> int:
        return self.plan.recipe.recipe.threads

    @property
    def model_dir(self) -> Path:
        """The checkpoint made by the last model stage (source / merge / bake)."""
        return self.inputs[self.plan.model_stage] / self.plan.release_name

    def input_dir(self, name: str) -> Path:
        return self.inputs[name]


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the file system allows it (no extra disk), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def gguf_file_name(plan: Plan, type_name: str) -> str:
    return f"{plan.release_name}-{type_name}.gguf"
