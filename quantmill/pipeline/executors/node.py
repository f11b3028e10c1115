"""One stage of a plan, run in a work directory: what every executor runs, in-process or in a Ray worker.

``run_node`` writes the stage into a temporary directory next to its final one
(``stages/.<name>-<key>.*.part``) and renames it into place with ``.stage.json`` inside. It first
removes the temporaries of its own stage that an interrupted attempt left (a Ray task whose worker
died is retried while the run goes on); other stages' temporaries are not its business.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

from quantmill.atomic import atomic_dir
from quantmill.manifest import file_records
from quantmill.pipeline.context import StageContext
from quantmill.pipeline.plan import DONE_FILE, Node, Plan
from quantmill.pipeline.stages import STAGES
from quantmill.redact import RedactingFormatter

LOG = logging.getLogger("quantmill.pipeline")
LOG_FILE = "quantmill.log"


def own_temporaries(node: Node, work_dir: Path) -> list[Path]:
    """Temporaries of ``node``'s own directory (``.<name>-<key16>.<pid>-<n>.part``), none of another stage's."""
    final = node.directory(work_dir)
    return sorted(final.parent.glob(f".{final.name}.*.part"))


def run_node(plan: Plan, node: Node, work_dir: Path, progress: bool) -> None:
    """Run ``node`` of ``plan`` into its directory under ``work_dir`` (its dependencies are finished)."""
    for tmp in own_temporaries(node, work_dir):
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        LOG.info("stage %s: removed %s left by an interrupted attempt", node.name, tmp.name)
    deps = [plan.node(dep) for dep in node.deps]
    inputs = {dep.name: dep.directory(work_dir) for dep in deps}
    outputs = tuple((inputs[dep.name] / out.src, out) for dep in deps for out in STAGES[dep.kind].outputs(dep.params))
    checkpoints = node.checkpoints(work_dir)
    if checkpoints.is_dir():
        LOG.info("stage %s: layer checkpoints of an interrupted run found in %s", node.name, checkpoints)
    with atomic_dir(node.directory(work_dir)) as tmp:
        memory = plan.recipe.recipe.resources.memory
        STAGES[node.kind].run(StageContext(tmp, inputs, outputs, plan.release_name, node.paths, progress, checkpoints,
                                           None if memory is None else int(memory)), node.params)
        done = {"name": node.name, "kind": node.kind, "key": node.key, "params": node.params.model_dump(mode="json"),
                "deps": list(node.deps), "files": {k: v["sha256"] for k, v in file_records(tmp, skip=()).items()}}
        (tmp / DONE_FILE).write_text(json.dumps(done, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if checkpoints.is_dir():  # the stage is done: its checkpoints are not needed again
        shutil.rmtree(checkpoints)
    with contextlib.suppress(OSError):
        checkpoints.parent.rmdir()  # when it exists and no other stage holds checkpoints


def set_threads(threads: int) -> None:
    """torch's intra-op threads: the recipe's ``threads`` in every process that runs stages (same bytes everywhere)."""
    import torch

    torch.set_num_threads(threads)


@contextlib.contextmanager
def work_log(work_dir: Path, where: str | None = None) -> Iterator[None]:
    """The ``quantmill`` loggers also write to ``WORK/quantmill.log`` (appended; ``where`` tags a remote worker's lines)."""
    handler = logging.FileHandler(work_dir / LOG_FILE, encoding="utf-8")
    tag = f" [{where.replace('%', '%%')}]" if where else ""
    handler.setFormatter(RedactingFormatter(f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger("quantmill")
    previous = root.level
    root.addHandler(handler)
    root.setLevel(min(previous or logging.INFO, logging.INFO))
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
        handler.close()
