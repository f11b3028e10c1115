"""The Ray executor: ``quantmill run --executor ray [--address HOST:PORT]`` runs the plan's DAG on a running Ray cluster.

Ray is the engine; this module only submits. Every stage whose dependencies are finished becomes one Ray task
(named ``quantmill:<stage>``, so its worker's process title is ``ray::quantmill:<stage>``) that asks for
``min(threads, the largest node's CPUs)`` CPUs, the memory its cost estimate predicts (when it has one) and one GPU
when its devices include CUDA; GPTQ, the GGUF quantizations and verify then run side by side on whichever nodes
have room. The task calls the same :func:`~quantmill.pipeline.executors.node.run_node` as the local executor, into
the same stage directories, so the work directory must be a path every node sees (a shared file system mounted at
the same place), and a run resumes across executors. A task whose worker dies is retried by Ray
(``max_retries``); the retry first removes its own stage's temporaries, and layer-by-layer stages resume from their
layer checkpoints. A stage's ``QuantmillError`` comes back to the driver as data and is raised there as one line.

Ray is an optional extra (``pip install 'quantmill[ray]'``): ``import ray`` happens only inside this module's
functions, and the driver never starts a cluster of its own.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantmill.errors import QuantmillError, ToolError, UserInputError
from quantmill.pipeline.executors.base import LOG, Executor, ExecutorOptions, log_finished, log_started, node_devices

if TYPE_CHECKING:
    from quantmill.pipeline.plan import Node, Plan
    from quantmill.pipeline.report import RunReport

RETRIES = 3  # Ray re-runs a task whose worker (or node) died this many times
TASK_PREFIX = "quantmill:"
CONNECT_TIMEOUT_SECONDS = 5.0
WAIT_SECONDS = 0.25  # how often the driver looks for tasks that started
FORWARDED_ENV = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")  # and every QUANTMILL_*; never a token
INSTALL = "pip install 'quantmill[ray]'"


class RemoteStageError(QuantmillError):
    """A stage's QuantmillError raised in a Ray worker: its one-line message, with the exit code it had there."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class StageLostError(ToolError):
    """A stage's Ray task failed for a reason of Ray's (its worker kept dying, its node left the cluster)."""


def _host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserInputError(f"--address {address!r}: expected HOST:PORT, the Ray head's address (ray start --head --port PORT)")
    return host.strip("[]"), int(port)


def _check_reachable(address: str) -> None:
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_SECONDS):
            pass
    except OSError as exc:
        raise UserInputError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc}); start one with "
                             f"`ray start --head --port {port}` or fix --address") from None


def _runtime_env() -> dict[str, Any] | None:
    """The driver's quantmill and Hugging Face cache settings, for the workers (tokens stay out: Ray records this)."""
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("QUANTMILL_") or k in FORWARDED_ENV}
    return {"env_vars": env} if env else None


def _wants_cuda(node: Node) -> bool:
    """A stage that runs on CUDA: verify with cuda among its devices, a torch stage whose device is cuda."""
    return any(device.startswith("cuda") for _field, device in node_devices(node))


def resource_requests(plan: Plan, nodes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The Ray resources of each unfinished stage, given the cluster's nodes (``ray.nodes()``); refuses a plan that
    no node could take (no CPU; CUDA asked, no GPU)."""
    from quantmill.pipeline.estimate import model_size
    from quantmill.pipeline.stages import STAGES

    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    cpus = int(max((r.get("CPU", 0) for r in alive), default=0))
    gpus = max((r.get("GPU", 0) for r in alive), default=0)
    memory = int(max((r.get("memory", 0) for r in alive), default=0))
    if cpus < 1:
        raise UserInputError("--executor ray: no node of the Ray cluster has a CPU; add one with `ray start --address HOST:PORT`")
    work_dir = plan.recipe.work_dir
    todo = [node for node in plan.nodes if not node.is_done(work_dir)]
    size = model_size(plan) if todo else None
    requests = {}
    for node in todo:
        request: dict[str, Any] = {"num_cpus": min(plan.recipe.recipe.threads, cpus), "num_gpus": 0}
        if _wants_cuda(node):
            if gpus < 1:
                raise UserInputError(f"{plan.recipe.path}: stage {node.name} runs on CUDA (its devices include cuda) but no node "
                                     "of the Ray cluster has a GPU; add a GPU node, or remove cuda from verify.devices and resources.device")
            request["num_gpus"] = 1
        needed = None if size is None else STAGES[node.kind].estimate(size, node.params).required  # mapped files: page cache
        if needed is not None:
            if needed > memory:
                LOG.warning("stage %s: its estimated memory (%d bytes) exceeds every Ray node's (%d); asking for %d",
                            node.name, needed, memory, memory)
            request["memory"] = min(needed, memory)
        requests[node.name] = request
    return requests


@contextlib.contextmanager
def connect(plan: Plan, options: ExecutorOptions) -> Iterator[None]:
    """Join the running cluster at ``options.address`` (None: the one ``ray start`` left on this machine), check it
    can run ``plan``, and leave it at the end; never starts a cluster."""
    try:
        import ray
    except ImportError:
        raise UserInputError(f"--executor ray: Ray is not installed; {INSTALL}") from None
    if options.address is not None:
        _check_reachable(options.address)
    address = options.address or "auto"
    # Ray's driver prints the raylet's notices (a worker died, ...) on stdout: they are diagnostics, so they go to
    # stderr while connected, and stdout stays the --json report's
    with contextlib.redirect_stdout(sys.stderr):
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, runtime_env=_runtime_env())
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserInputError(f"--executor ray: cannot join a Ray cluster at {address} ({first}); start one with "
                                 "`ray start --head` or give --address HOST:PORT") from None
        try:
            resource_requests(plan, ray.nodes())
            yield
        finally:
            ray.shutdown()


class StartReports:
    """A Ray actor: each stage's task reports where it started (before it works); the driver drains the reports."""

    def __init__(self) -> None:
        self._starts: list[tuple[str, str]] = []

    def started(self, name: str, where: str) -> None:
        self._starts.append((name, where))

    def drain(self) -> list[tuple[str, str]]:
        starts, self._starts = self._starts, []
        return starts


def run_stage(plan: Plan, name: str, work_dir: str, reporter: Any) -> dict[str, Any]:
    """The Ray task of stage ``name``: where it ran and for how long, or ``{"error", "exit_code"}`` for a QuantmillError."""
    import ray

    from quantmill.outputs import write_error
    from quantmill.pipeline.executors.node import run_node, set_threads, work_log

    node = plan.node(name)
    where = f"{ray.util.get_node_ip_address()} (node {ray.get_runtime_context().get_node_id()[:8]}, pid {os.getpid()})"
    with contextlib.suppress(ray.exceptions.RayError):  # the reports are for people; a lost one stops nothing
        ray.get(reporter.started.remote(name, where))
    work = Path(work_dir)
    unseen = [dep for dep in node.deps if not plan.node(dep).is_done(work)]
    if not work.is_dir() or unseen:
        missing = f"the finished stage(s) {', '.join(unseen)}" if unseen else "it"
        return {"error": f"{work}: the work directory of stage {name} on {where} does not hold {missing}; put work_dir on "
                         "a file system every Ray node mounts at the same path", "exit_code": UserInputError.exit_code}
    set_threads(plan.recipe.recipe.threads)
    began = time.perf_counter()
    try:
        with work_log(work, where):
            try:
                run_node(plan, node, work, progress=False)
            except (QuantmillError, OSError):
                LOG.exception("stage %s failed", name)
                raise
    except QuantmillError as exc:
        return {"error": str(exc), "exit_code": exc.exit_code}
    except OSError as exc:  # as the CLI does in-process: a write failure is one line, anything else a traceback
        error = write_error(exc, exc.filename or work, action=exc.strerror or "failed")
        if error is None:
            raise
        return {"error": str(error), "exit_code": error.exit_code}
    return {"where": where, "seconds": round(time.perf_counter() - began, 2)}


def _result(ref: Any, node: Node) -> dict[str, Any]:
    import ray

    try:
        result: dict[str, Any] = ray.get(ref)
    except ray.exceptions.RayTaskError:  # a stage's bug (not a QuantmillError): its traceback, as in-process
        LOG.exception("stage %s failed", node.name)
        raise
    except ray.exceptions.RayError as exc:
        LOG.error("stage %s: its Ray task was lost: %s", node.name, exc)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise StageLostError(f"stage {node.name}: its Ray task failed {RETRIES + 1} times or its node left the cluster "
                             f"({type(exc).__name__}: {first}); see the Ray logs (session_latest/logs on each node)") from None
    if "error" in result:
        LOG.error("stage %s failed: %s", node.name, result["error"])
        raise RemoteStageError(result["error"], int(result["exit_code"]))
    return result


def run(plan: Plan, report: RunReport, work_dir: Path, progress: bool, options: ExecutorOptions) -> None:
    """Submit every stage whose dependencies are finished, wait for any to finish, repeat (see the module docstring)."""
    import ray
    from tqdm import tqdm

    rows = {r["stage"]: r for r in report.stages}
    requests = resource_requests(plan, ray.nodes())
    done = set()
    for node in plan.nodes:
        if node.is_done(work_dir):
            rows[node.name]["status"] = "done"
            done.add(node.name)
    task = ray.remote(run_stage)
    reporter: Any = ray.remote(num_cpus=0)(StartReports).remote()  # an ActorHandle; its methods have .remote
    plan_ref = ray.put(plan)
    running: dict[Any, Node] = {}
    submitted: set[str] = set()
    attempts: dict[str, int] = {}
    with tqdm(total=len(plan.nodes), initial=len(done), desc="release", unit="stage", disable=not progress) as bar:
        try:
            while len(done) < len(plan.nodes):
                for node in plan.nodes:  # in plan order: the same stages get the free nodes first on every run
                    if node.name not in done and node.name not in submitted and all(dep in done for dep in node.deps):
                        ref = task.options(name=TASK_PREFIX + node.name, max_retries=RETRIES, retry_exceptions=False,
                                           **requests[node.name]).remote(plan_ref, node.name, str(work_dir), reporter)
                        running[ref] = node
                        submitted.add(node.name)
                        LOG.info("stage %s (%s) submitted to Ray (%s)", node.name, node.key[:16],
                                 ", ".join(f"{k} {v}" for k, v in requests[node.name].items()))
                assert running, "no stage can start: the plan's dependencies are not a DAG"
                ready, _ = ray.wait(list(running), num_returns=1, timeout=WAIT_SECONDS)
                with contextlib.suppress(ray.exceptions.RayError):
                    for name, where in ray.get(reporter.drain.remote()):
                        attempts[name] = attempts.get(name, 0) + 1
                        again = "" if attempts[name] == 1 else f" again (attempt {attempts[name]})"
                        left = sum(r["estimated_seconds"] or 0 for n, r in rows.items() if n not in done)
                        log_started(plan, rows[name], plan.node(name), where, left, again)
                for ref in ready:
                    node = running.pop(ref)
                    result = _result(ref, node)
                    row = rows[node.name]
                    row["status"] = "ran"
                    row["seconds"] = result["seconds"]  # the attempt that finished, timed where it ran
                    row["attempts"] = attempts.get(node.name, 1)
                    row["node"] = result["where"]
                    done.add(node.name)
                    log_finished(plan, row, node)
                    bar.set_postfix_str(node.name)
                    bar.update(1)
        except BaseException:
            for ref in running:  # a failed stage (or Ctrl-C) ends the run: the others' temporaries go next run
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            raise


EXECUTOR = Executor("ray", connect, run)
