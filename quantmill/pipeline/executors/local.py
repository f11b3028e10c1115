"""The default executor: every unfinished stage in this process, one after another in plan order."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from quantmill.errors import QuantmillError
from quantmill.pipeline.executors.base import HERE, LOG, Executor, ExecutorOptions, log_finished, log_started, node_devices

if TYPE_CHECKING:
    from quantmill.pipeline.plan import Plan
    from quantmill.pipeline.report import RunReport


@contextlib.contextmanager
def connect(plan: Plan, options: ExecutorOptions) -> Iterator[None]:
    """Nothing to reach (this process runs the stages); a device this machine lacks is refused before any work."""
    from quantmill.device import resolve_device

    for node in plan.nodes:
        if not node.is_done(plan.recipe.work_dir):
            for field, device in node_devices(node):
                resolve_device(device, f"{plan.recipe.path}: {field}")
    yield


def run(plan: Plan, report: RunReport, work_dir: Path, progress: bool, options: ExecutorOptions) -> None:
    from tqdm import tqdm

    from quantmill.pipeline.executors.node import run_node, set_threads

    set_threads(plan.recipe.recipe.threads)
    rows = {r["stage"]: r for r in report.stages}
    todo = [n for n in plan.nodes if not n.is_done(work_dir)]
    with tqdm(total=len(plan.nodes), initial=len(plan.nodes) - len(todo), desc="release", unit="stage",
              disable=not progress) as bar:
        for node in plan.nodes:
            row = rows[node.name]
            if node.is_done(work_dir):
                row["status"] = "done"
                continue
            bar.set_postfix_str(node.name)
            left = sum(rows[n.name]["estimated_seconds"] or 0 for n in todo[todo.index(node):])
            log_started(plan, row, node, HERE, left)
            started = time.perf_counter()
            try:
                run_node(plan, node, work_dir, progress)
            except QuantmillError:
                LOG.exception("stage %s failed", node.name)
                raise
            row["status"] = "ran"
            row["seconds"] = round(time.perf_counter() - started, 2)
            log_finished(plan, row, node)
            bar.update(1)


EXECUTOR = Executor("local", connect, run)
