"""``quantmill run``: execute a plan's stages in a work directory, resumably, with an executor (in-process or Ray).

Each stage writes into a temporary directory next to its final one (``stages/.<name>-<key>.*.part``)
and the directory is renamed into place, with ``.stage.json`` (its files' sha256) inside, only when
the stage has finished. A run killed at any point leaves finished stages and temporary directories;
the next run removes the temporaries and skips the finished stages. The release directory is then
exported to ``output`` as hard links, and published to the recipe's targets.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from quantmill.atomic import atomic_dir
from quantmill.errors import UserInputError, VerificationFailed
from quantmill.jsonio import read_json_object
from quantmill.manifest import MANIFEST
from quantmill.pipeline.capabilities import check_capabilities
from quantmill.pipeline.context import link_or_copy
from quantmill.pipeline.estimate import disk_needed, free_bytes, plan_table
from quantmill.pipeline.executors import DEFAULT, EXECUTORS, Executor, ExecutorOptions
from quantmill.pipeline.executors.node import work_log
from quantmill.pipeline.plan import CHECKPOINTS_DIR, DONE_FILE, STAGES_DIR, Plan, build_plan
from quantmill.pipeline.report import RunReport
from quantmill.pipeline.stages import STAGES
from quantmill.recipe import LoadedRecipe
from quantmill.recipe_load import check_release_output
from quantmill.units import human_bytes

LOG = logging.getLogger("quantmill.pipeline")
LOCK_FILE = ".lock"


class WorkDirBusyError(UserInputError):
    """Another run holds the work directory."""


def format_plan(report: RunReport) -> str:
    lines = [f"work directory: {report.work_dir}", f"output: {report.output_dir}", "",
             f"{'stage':<22} {'key':<16} {'status':<8} {'est. size':>10} {'est. time':>10} {'peak memory':>12}"]
    for row in report.stages:
        secs = row["estimated_seconds"]
        lines.append(f"{row['stage']:<22} {row['key']:<16} {row['status']:<8} {human_bytes(row['estimated_bytes']):>10} "
                     f"{'?' if secs is None else f'{secs:.0f} s':>10} {human_bytes(row.get('estimated_memory')):>12}")
    total = report.as_json()["estimated_seconds"]
    lines += ["", (f"disk needed: {human_bytes(report.disk_needed)} (free: {human_bytes(report.disk_free)}); "
                   f"estimated time: {total:.0f} s at the recipe's thread count; peak memory: "
                   f"{human_bytes(max((r.get('estimated_memory') or 0 for r in report.stages), default=0) or None)} "
                   f"(this machine: {human_bytes(machine_memory())})"), *(f"refused here: {n}" for n in report.notes)]
    return "\n".join(lines)


def machine_memory() -> int:
    """Physical memory of this machine, bytes."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _check_memory(loaded: LoadedRecipe, rows: list[dict[str, Any]]) -> None:
    """Every stage still to run fits resources.memory (else this machine's memory), before any work."""
    budget = loaded.recipe.resources.memory
    limit, what = (int(budget), "resources.memory") if budget is not None else (machine_memory(), "this machine's memory")
    for row in rows:
        need = row.get("estimated_memory_required")  # mapped files (page cache) need no free memory
        if row["status"] != "done" and need is not None and need > limit:
            hint = ("set resources.memory to spill its activation streams to disk" if STAGES[row["kind"]].spills and budget is None
                    else "run it on a machine with more memory" + (", or raise resources.memory" if budget is not None else ""))
            raise UserInputError(f"{loaded.path}: stage {row['stage']} needs about {human_bytes(need)} of memory, more than "
                                 f"{what} ({human_bytes(limit)}); {hint}")


def _check_disk(loaded: LoadedRecipe, needed: int | None, free: int) -> None:
    reserve = int(loaded.recipe.disk_reserve)
    if needed is not None and needed + reserve > free:
        raise UserInputError(
            f"{loaded.path}: the run needs about {human_bytes(needed)} (plus disk_reserve {human_bytes(reserve)}) but only "
            f"{human_bytes(free)} is free under {loaded.work_dir}; free some space or choose another work_dir")


def prepare(loaded: LoadedRecipe, dry_run: bool = False) -> tuple[Plan, RunReport]:
    """Plan and estimate; nothing is written (``dry_run``: a source may be config.json alone)."""
    plan = build_plan(loaded, weights=not dry_run)
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


def export_release(release_stage: Path, output_dir: Path) -> bool:
    """Hard-link the release stage into ``output_dir``; False when it is already there."""
    current = output_dir / MANIFEST
    if current.is_file() and current.read_bytes() == (release_stage / MANIFEST).read_bytes():
        return False
    with atomic_dir(output_dir) as tmp:
        for path in sorted(p for p in release_stage.rglob("*") if p.is_file() and p.name != DONE_FILE):
            link_or_copy(path, tmp / path.relative_to(release_stage))
    return True


def run_recipe(loaded: LoadedRecipe, *, dry_run: bool = False, progress: bool = False, publish: bool = True,
               force: bool = False, executor: str = DEFAULT, address: str | None = None) -> RunReport:
    """Run (or with ``dry_run`` only plan) ``loaded`` with ``executor`` (``address``: its Ray cluster); see the module
    docstring."""
    chosen = _executor(executor, address)
    plan, report = prepare(loaded, dry_run)
    for check in (lambda: _check_disk(loaded, report.disk_needed, report.disk_free), lambda: _check_memory(loaded, report.stages)):
        try:
            check()
        except UserInputError as exc:
            if not dry_run:
                raise
            report.notes.append(str(exc))  # the plan of a release this machine cannot hold is still worth seeing
    if dry_run:
        return report
    report.dry_run = False
    work_dir = loaded.work_dir
    options = ExecutorOptions(address)
    with chosen.connect(plan, options):  # refuses what the executor cannot run, before anything is written
        work_dir.mkdir(parents=True, exist_ok=True)
        with _locked(work_dir), work_log(work_dir):
            LOG.info("run %s (%d stages, threads %d, executor %s)", loaded.path, len(plan.nodes), loaded.recipe.threads,
                     chosen.name)
            for name in remove_stale_temporaries(work_dir, plan):
                LOG.info("removed %s left by an interrupted run", name)
            chosen.run(plan, report, work_dir, progress, options)
            _finish(loaded, plan, report, publish=publish, force=force)
    return report


def _executor(name: str, address: str | None) -> Executor:
    if name not in EXECUTORS:
        raise UserInputError(f"--executor {name!r}: not an executor; choose one of {', '.join(EXECUTORS)}")
    if address is not None and name == DEFAULT:
        raise UserInputError(f"--address {address}: only for --executor ray (the {DEFAULT} executor runs here)")
    return EXECUTORS[name]


def _finish(loaded: LoadedRecipe, plan: Plan, report: RunReport, *, publish: bool, force: bool) -> None:
    """Export the finished release, read its verdict, publish it."""
    work_dir = loaded.work_dir
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
