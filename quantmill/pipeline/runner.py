"""``quantmill run``: execute a plan stage by stage in a work directory, resumably.

Each stage writes into a temporary directory next to its final one (``stages/.<name>-<key>.*.part``)
and the directory is renamed into place, with ``.stage.json`` (its files' sha256) inside, only when
the stage has finished. A run killed at any point leaves finished stages and temporary directories;
the next run removes the temporaries and skips the finished stages. The release directory is then
exported to ``output`` as hard links, and published to the recipe's targets.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantmill.atomic import atomic_dir
from quantmill.errors import QuantmillError, UserInputError, VerificationFailed
from quantmill.jsonio import read_json_object
from quantmill.manifest import MANIFEST, file_records
from quantmill.pipeline.capabilities import check_capabilities
from quantmill.pipeline.context import StageContext, link_or_copy
from quantmill.pipeline.estimate import disk_needed, free_bytes, plan_table
from quantmill.pipeline.plan import CHECKPOINTS_DIR, DONE_FILE, STAGES_DIR, Node, Plan, build_plan
from quantmill.pipeline.stages import STAGES
from quantmill.progress import LOGGER_NAME as PROGRESS_LOGGER
from quantmill.progress import duration
from quantmill.recipe import LoadedRecipe
from quantmill.recipe_load import check_release_output
from quantmill.redact import RedactingFormatter

LOG = logging.getLogger("quantmill.pipeline")
PROGRESS = logging.getLogger(PROGRESS_LOGGER)
LOG_FILE = "quantmill.log"
LOCK_FILE = ".lock"


class WorkDirBusyError(UserInputError):
    """Another run holds the work directory."""


@dataclass
class RunReport:
    """What ``run`` did, for people (``lines``) and for ``--json``."""

    work_dir: Path
    output_dir: Path
    stages: list[dict[str, Any]]
    disk_needed: int | None
    disk_free: int
    dry_run: bool
    verification_passed: bool | None = None
    published: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "work_dir": str(self.work_dir), "output": str(self.output_dir), "dry_run": self.dry_run,
            "disk_needed_bytes": self.disk_needed, "disk_free_bytes": self.disk_free,
            "estimated_seconds": round(sum(r["estimated_seconds"] or 0 for r in self.stages if r.get("status") != "done"), 1),
            "stages": self.stages, "verification_passed": self.verification_passed, "published": self.published,
        }


def _human(n: float | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def format_plan(report: RunReport) -> str:
    lines = [f"work directory: {report.work_dir}", f"output: {report.output_dir}", "",
             f"{'stage':<22} {'key':<16} {'status':<8} {'est. size':>10} {'est. time':>10}"]
    for row in report.stages:
        secs = row["estimated_seconds"]
        lines.append(f"{row['stage']:<22} {row['key']:<16} {row['status']:<8} {_human(row['estimated_bytes']):>10} "
                     f"{'?' if secs is None else f'{secs:.0f} s':>10}")
    total = report.as_json()["estimated_seconds"]
    lines += ["", (f"disk needed: {_human(report.disk_needed)} (free: {_human(report.disk_free)}); "
                   f"estimated time: {total:.0f} s at the recipe's thread count")]
    return "\n".join(lines)


def _check_disk(loaded: LoadedRecipe, needed: int | None, free: int) -> None:
    reserve = int(loaded.recipe.disk_reserve)
    if needed is not None and needed + reserve > free:
        raise UserInputError(
            f"{loaded.path}: the run needs about {_human(needed)} (plus disk_reserve {_human(reserve)}) but only "
            f"{_human(free)} is free under {loaded.work_dir}; free some space or choose another work_dir")


def prepare(loaded: LoadedRecipe) -> tuple[Plan, RunReport]:
    """Plan, estimate and check the disk; nothing is written."""
    plan = build_plan(loaded)
    check_capabilities(plan)
    rows = plan_table(plan, loaded.work_dir)
    return plan, RunReport(loaded.work_dir, loaded.output_dir, rows, disk_needed(rows), free_bytes(loaded.work_dir),
                           dry_run=True)


@contextlib.contextmanager
def _locked(work_dir: Path) -> Iterator[None]:
    with open(work_dir / LOCK_FILE, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkDirBusyError(f"{work_dir}: another quantmill run is using this work directory; wait for it") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _log_file(work_dir: Path) -> Iterator[None]:
    handler = logging.FileHandler(work_dir / LOG_FILE, encoding="utf-8")
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
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


def remove_stale_temporaries(work_dir: Path, plan: Plan | None = None) -> list[str]:
    """Temporary directories and files that a killed run left behind (``.*.part``), and layer checkpoints of
    stages that are no longer in ``plan`` (a changed recipe)."""
    removed = []
    held = work_dir / STAGES_DIR / CHECKPOINTS_DIR
    if plan is not None and held.is_dir():
        keep = {node.checkpoints(work_dir).name for node in plan.nodes}
        for path in sorted(p for p in held.iterdir() if p.name not in keep):
            shutil.rmtree(path)
            removed.append(f"{CHECKPOINTS_DIR}/{path.name}")
    for parent in (work_dir / STAGES_DIR, work_dir):
        if not parent.is_dir():
            continue
        for path in sorted(parent.glob(".*.part")):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path.name)
    return removed


def _run_node(plan: Plan, node: Node, work_dir: Path, progress: bool) -> None:
    deps = [plan.node(dep) for dep in node.deps]
    inputs = {dep.name: dep.directory(work_dir) for dep in deps}
    outputs = tuple((inputs[dep.name] / out.src, out) for dep in deps for out in STAGES[dep.kind].outputs(dep.params))
    checkpoints = node.checkpoints(work_dir)
    if checkpoints.is_dir():
        LOG.info("stage %s: layer checkpoints of an interrupted run found in %s", node.name, checkpoints)
    with atomic_dir(node.directory(work_dir)) as tmp:
        STAGES[node.kind].run(StageContext(tmp, inputs, outputs, plan.release_name, node.paths, progress, checkpoints),
                              node.params)
        done = {"name": node.name, "kind": node.kind, "key": node.key, "params": node.params.model_dump(mode="json"),
                "deps": list(node.deps), "files": {k: v["sha256"] for k, v in file_records(tmp, skip=()).items()}}
        (tmp / DONE_FILE).write_text(json.dumps(done, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if checkpoints.is_dir():  # the stage is done: its checkpoints are not needed again
        shutil.rmtree(checkpoints)
    with contextlib.suppress(OSError):
        checkpoints.parent.rmdir()  # when it exists and no other stage holds checkpoints


def export_release(release_stage: Path, output_dir: Path) -> bool:
    """Hard-link the release stage into ``output_dir``; False when it is already there."""
    current = output_dir / MANIFEST
    if current.is_file() and current.read_bytes() == (release_stage / MANIFEST).read_bytes():
        return False
    with atomic_dir(output_dir) as tmp:
        for path in sorted(p for p in release_stage.rglob("*") if p.is_file() and p.name != DONE_FILE):
            link_or_copy(path, tmp / path.relative_to(release_stage))
    return True


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_recipe(loaded: LoadedRecipe, *, dry_run: bool = False, progress: bool = False, publish: bool = True,
               force: bool = False) -> RunReport:
    """Run (or with ``dry_run`` only plan) ``loaded``; see the module docstring."""
    plan, report = prepare(loaded)
    _check_disk(loaded, report.disk_needed, report.disk_free)
    if dry_run:
        return report
    report.dry_run = False
    work_dir = loaded.work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    with _locked(work_dir), _log_file(work_dir):
        LOG.info("run %s (%d stages, threads %d)", loaded.path, len(plan.nodes), loaded.recipe.threads)
        for name in remove_stale_temporaries(work_dir, plan):
            LOG.info("removed %s left by an interrupted run", name)
        _set_threads(loaded.recipe.threads)
        _run_all(plan, report, work_dir, progress)
        release_dir = plan.node("release").directory(work_dir)
        check_release_output(loaded)  # again: the output may have appeared while the stages ran
        exported = export_release(release_dir, loaded.output_dir)
        LOG.info("release %s %s", loaded.output_dir, "exported" if exported else "already up to date")
        verification = read_json_object(release_dir / MANIFEST, "re-run the release").get("verification")
        report.verification_passed = None if verification is None else bool(verification["passed"])
        failed = [a["name"] for a in (verification or {}).get("artifacts", []) if a.get("passed") is False]
        if failed:
            LOG.warning("verification failed: %s", ", ".join(failed))
        if publish and loaded.recipe.publish:
            from quantmill.publish import publish_release

            report.published = publish_release(loaded.output_dir, loaded.recipe.publish, work_dir=work_dir, force=force)
        elif failed and not force:
            raise VerificationFailed(f"{loaded.output_dir}: verification failed for {', '.join(failed)}; the release is "
                                     "built, see its verify/report.md; fix the recipe, or pass --force to accept it")
    return report


def _eta(seconds: float | None) -> str:
    return "unknown" if seconds is None else duration(seconds)


def _run_all(plan: Plan, report: RunReport, work_dir: Path, progress: bool) -> None:
    from tqdm import tqdm

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
            LOG.info("stage %s (%s) started", node.name, node.key[:16])
            left = sum(rows[n.name]["estimated_seconds"] or 0 for n in todo[todo.index(node):])
            PROGRESS.info("stage %d/%d %s started here (estimated %s; release ETA %s)", plan.nodes.index(node) + 1,
                          len(plan.nodes), node.name, _eta(row["estimated_seconds"]), _eta(left))
            started = time.perf_counter()
            try:
                _run_node(plan, node, work_dir, progress)
            except QuantmillError:
                LOG.exception("stage %s failed", node.name)
                raise
            row["status"] = "ran"
            row["seconds"] = round(time.perf_counter() - started, 2)
            LOG.info("stage %s finished in %.1f s", node.name, row["seconds"])
            PROGRESS.info("stage %d/%d %s finished in %s", plan.nodes.index(node) + 1, len(plan.nodes), node.name,
                          duration(row["seconds"]))
            bar.update(1)
