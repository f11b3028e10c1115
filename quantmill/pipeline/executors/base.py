"""What an executor is: a record with ``connect`` (reach the engine, refuse what cannot run, before any work) and
``run`` (run every unfinished stage of a plan, filling the report's rows), plus the log lines both executors write.

Stage keys and directories are the plan's, whoever runs the stages, so a run resumes across executors.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantmill.progress import LOGGER_NAME as PROGRESS_LOGGER
from quantmill.progress import duration

if TYPE_CHECKING:
    from quantmill.pipeline.plan import Node, Plan
    from quantmill.pipeline.report import RunReport

LOG = logging.getLogger("quantmill.pipeline")
PROGRESS = logging.getLogger(PROGRESS_LOGGER)
HERE = "here"  # where the local executor runs a stage


def node_devices(node: Node) -> tuple[tuple[str, str], ...]:
    """(recipe field, device) of each device a stage runs on: verify's ``devices``, a torch stage's ``device``."""
    found = [("verify.devices", d) for d in getattr(node.params, "devices", ()) or ()]
    if (device := getattr(node.params, "device", "cpu")) != "cpu":
        found.append(("resources.device", device))
    return tuple(found)


@dataclass(frozen=True)
class ExecutorOptions:
    """The command line's executor settings: ``address`` is the Ray cluster's HOST:PORT (None: the running one)."""

    address: str | None = None


@dataclass(frozen=True)
class Executor:
    """One way to run a plan's stages. ``connect(plan, options)`` is held for the whole run; it raises a one-line
    UserInputError before anything is written when the executor cannot run ``plan``. ``run(plan, report, work_dir,
    progress, options)`` runs every unfinished stage and sets each row's ``status`` ("ran" / "done") and ``seconds``."""

    name: str
    connect: Callable[[Plan, ExecutorOptions], AbstractContextManager[None]]
    run: Callable[[Plan, RunReport, Path, bool, ExecutorOptions], None]


def _eta(seconds: float | None) -> str:
    return "unknown" if seconds is None else duration(seconds)


def log_started(plan: Plan, row: dict[str, Any], node: Node, where: str, left: float, again: str = "") -> None:
    """``stage X (key) started`` in the log; ``stage i/n X started here|on IP (estimated ..; release ETA ..)`` as progress."""
    LOG.info("stage %s (%s) started%s%s", node.name, node.key[:16], "" if where == HERE else f" on {where}", again)
    PROGRESS.info("stage %d/%d %s started %s%s (estimated %s; release ETA %s)", plan.nodes.index(node) + 1,
                  len(plan.nodes), node.name, HERE if where == HERE else f"on {where}", again,
                  _eta(row["estimated_seconds"]), _eta(left))


def log_finished(plan: Plan, row: dict[str, Any], node: Node) -> None:
    LOG.info("stage %s finished in %.1f s", node.name, row["seconds"])
    PROGRESS.info("stage %d/%d %s finished in %s", plan.nodes.index(node) + 1, len(plan.nodes), node.name,
                  duration(row["seconds"]))
