"""`quantmill run --executor ray` on a real two-node Ray cluster on this machine, with one worker SIGKILLed mid-task:
Ray retries the task and the release's bytes equal the local executor's; and the refusals that come before any work.

The cluster is two `ray start` processes (a head and a second node, one CPU each) reached at 127.0.0.1, each in
a session of its own, so that the fixture stops exactly this cluster (SIGKILL to every process of both sessions
until none is left, within a bounded wait), also when the test fails. `ray stop --force` is not used: it stops
every Ray process of the machine, a developer's own cluster too. (Ray advertises a node started with
`--node-ip-address 127.0.0.1` under the machine's own address, `services.resolve_ip_for_localhost`, and its
servers listen on every interface; the driver joins through 127.0.0.1.)
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from release_helpers import QUANTMILL, TINY_RECIPE, cli, make_tiny_model, output_hashes, write_recipe

RAY = Path(sys.executable).with_name("ray")
START_TIMEOUT = 120.0
RUN_TIMEOUT = 600.0
KILLED_STAGE = "gptq"  # the longest stage of the tiny recipe, layer by layer with checkpoints


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _state_and_session(pid: int) -> tuple[str, int] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "(comm)": state, ppid, pgrp, session, ...
    return fields[0], int(fields[3])


def _processes(sessions: set[int]) -> dict[int, str]:
    """pid -> command line (a Ray worker's is its process title) of every live process of ``sessions``."""
    found = {}
    for entry in Path("/proc").iterdir():
        info = _state_and_session(int(entry.name)) if entry.name.isdigit() else None
        if info is not None and info[0] != "Z" and info[1] in sessions:
            with contextlib.suppress(OSError):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    return found


def _stop(sessions: set[int]) -> dict[int, str]:
    """SIGKILL to every process of ``sessions`` (Ray puts each worker in a process group of its own, in its node's
    session); what is still alive after a bounded wait."""
    deadline = time.monotonic() + 30
    while (left := _processes(sessions)) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    return left


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[dict[str, Any]]:
    """A head and a second node (one CPU each) at 127.0.0.1:PORT; stopped at the end, whatever happened."""
    if not RAY.is_file():
        message = f"{RAY} is missing: pip install -e '.[ray]' (scripts/test.sh does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    port = _free_port()
    temp_dir = Path(f"/tmp/rayqm-{os.getpid()}")  # Ray's socket paths live under it: keep it short
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats", "--object-store-memory", "100000000"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    sessions: set[int] = set()
    try:
        for args in (["--head", "--port", str(port), "--include-dashboard=false", "--temp-dir", str(temp_dir)],
                     ["--address", f"127.0.0.1:{port}"]):
            start = subprocess.Popen([str(RAY), "start", *args, *common], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env, start_new_session=True)
            sessions.add(start.pid)  # the node's daemons and workers stay in the session of its `ray start`
            out, _ = start.communicate(timeout=START_TIMEOUT)
            assert start.returncode == 0, out[-3000:]
        yield {"address": f"127.0.0.1:{port}", "sessions": sessions}
    finally:
        left = _stop(sessions)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"Ray processes outlived the cluster: {left}"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _recipe(root: Path, model: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return write_recipe(root, {**TINY_RECIPE, "source": {"kind": "local", "path": str(model)}})


def _worker_running(stage: str, sessions: set[int], work: Path, process: subprocess.Popen[str]) -> int:
    """The pid of the cluster's worker running ``stage`` once it has begun writing (its ``.part`` directory exists)."""
    title = f"ray::quantmill:{stage}"
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        workers = [pid for pid, args in _processes(sessions).items() if args == title]
        if workers and list((work / "stages").glob(f".{stage}-*.part")):
            return workers[0]
        assert process.poll() is None, f"the run ended before stage {stage} was seen running"
        time.sleep(0.02)
    raise AssertionError(f"no worker ran stage {stage} within {RUN_TIMEOUT} s")


@pytest.mark.slow
def test_ray_run_with_a_killed_worker_gives_the_local_executors_bytes(ray_cluster: dict[str, Any], model: Path,
                                                                      tmp_path: Path) -> None:
    local = _recipe(tmp_path / "local", model)
    began = time.monotonic()
    cli("run", str(local), "--json", cwd=local.parent, check=True)
    local_seconds = time.monotonic() - began

    recipe = _recipe(tmp_path / "ray", model)
    work = recipe.parent / "work"
    began = time.monotonic()
    process = subprocess.Popen([*QUANTMILL, "run", str(recipe), "--executor", "ray", "--address", ray_cluster["address"],
                                "--json"], cwd=recipe.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        victim = _worker_running(KILLED_STAGE, ray_cluster["sessions"], work, process)
        killed_after = time.monotonic() - began
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=RUN_TIMEOUT)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    ray_seconds = time.monotonic() - began
    assert process.returncode == 0, stderr[-3000:]
    report = json.loads(stdout)  # stdout is the report alone: Ray's notices went to stderr
    rows = {row["stage"]: row for row in report["stages"]}
    print(json.dumps({"local_s": round(local_seconds, 1), "ray_s": round(ray_seconds, 1), "killed": KILLED_STAGE,
                      "killed_after_s": round(killed_after, 1), "victim_pid": victim,
                      "stages": {k: {f: r.get(f) for f in ("seconds", "attempts", "node")} for k, r in rows.items()}}, indent=1))
    assert {row["status"] for row in rows.values()} == {"ran"}
    assert rows[KILLED_STAGE]["attempts"] >= 2 and f"pid {victim}" not in rows[KILLED_STAGE]["node"]
    assert f"{KILLED_STAGE} started on" in stderr and "again (attempt 2)" in stderr
    log = (work / "quantmill.log").read_text(encoding="utf-8")
    assert f"stage {KILLED_STAGE}: removed .{KILLED_STAGE}-" in log  # the retry cleared the killed attempt's temporary
    assert len({row["node"].split("(node ")[1][:8] for row in rows.values()}) == 2  # both nodes ran stages
    assert output_hashes(work / "release") == output_hashes(local.parent / "work" / "release")
    assert not list(work.rglob("*.part")), "temporaries of the killed attempt were left behind"
    # the same stage keys as the local executor's: a local run of the same work directory finds everything done
    again = cli("run", str(recipe), "--json", cwd=recipe.parent, check=True)
    assert {row["status"] for row in json.loads(again.stdout)["stages"]} == {"done"}


@pytest.mark.slow
def test_a_stage_error_in_a_ray_task_is_the_drivers_one_line_error(ray_cluster: dict[str, Any], model: Path,
                                                                    tmp_path: Path) -> None:
    """A QuantmillError raised inside a task (an unknown pre-tokenizer, found by the gguf-base stage) ends the run
    with its own one line and exit code, as in-process, not a Ray traceback."""
    data = {**TINY_RECIPE, "source": {"kind": "local", "path": str(model)}, "gptq": None,
            "gguf": {"base": "f16", "types": [], "vocab_pre": "no-such-pre"}}
    recipe = write_recipe(tmp_path, data)
    result = subprocess.run([*QUANTMILL, "run", str(recipe), "--executor", "ray", "--address", ray_cluster["address"]],
                            cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1].startswith("quantmill: error: --vocab-pre 'no-such-pre' is not a llama.cpp")
    assert "Traceback" not in result.stderr and "RayTaskError" not in result.stderr
    assert "stage gguf-base failed" in (tmp_path / "work" / "quantmill.log").read_text(encoding="utf-8")


def _refused(recipe: Path, *args: str, pre: str = "") -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", f"{pre}import sys\nfrom quantmill.cli import main\nsys.exit(main(sys.argv[1:]))",
               "run", str(recipe), *args]
    result = subprocess.run(command, cwd=recipe.parent, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("quantmill: error: "), result.stderr
    assert not (recipe.parent / "work").exists()  # refused before any work
    return result


def test_ray_refusals_are_one_line_before_any_work(model: Path, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, model)
    closed = _refused(recipe, "--executor", "ray", "--address", f"127.0.0.1:{_free_port()}")
    assert "no Ray cluster answers there" in closed.stderr
    assert "expected HOST:PORT" in _refused(recipe, "--executor", "ray", "--address", "head-node").stderr
    assert "only for --executor ray" in _refused(recipe, "--address", "127.0.0.1:6379").stderr
    missing = _refused(recipe, "--executor", "ray", pre="import sys\nsys.modules['ray'] = None\n")
    assert "pip install 'quantmill[ray]'" in missing.stderr


def test_ray_resource_requests(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CPUs: the recipe's threads, at most the largest node's; memory: the estimate's, at most a node's; a GPU for
    a stage whose devices include cuda, refused when no node has one."""
    import dataclasses

    from quantmill.errors import UserInputError
    from quantmill.pipeline.context import Estimate
    from quantmill.pipeline.executors.ray import resource_requests
    from quantmill.pipeline.plan import build_plan
    from quantmill.pipeline.stages import STAGES
    from quantmill.recipe_load import load_recipe

    def node(cpus: float, memory: float, gpus: float = 0, alive: bool = True) -> dict[str, Any]:
        return {"Alive": alive, "Resources": {"CPU": cpus, "memory": memory, **({"GPU": gpus} if gpus else {})}}

    plan = build_plan(load_recipe(_recipe(tmp_path / "cpu", model)))
    for kind, memory in (("gptq", 5_000_000_000), ("gguf", None)):  # a stage with a memory estimate, one without
        monkeypatch.setitem(STAGES, kind, dataclasses.replace(STAGES[kind], estimate=lambda size, params, m=memory: Estimate(1, 1.0, m)))
    requests = resource_requests(plan, [node(1, 8e9), node(16, 16e9, alive=False)])
    assert set(requests) == {n.name for n in plan.nodes}
    assert {r["num_cpus"] for r in requests.values()} == {1} and {r["num_gpus"] for r in requests.values()} == {0}
    assert requests["gptq"]["memory"] == 5_000_000_000 and "memory" not in requests["gguf-Q4_K_M"]
    requests = resource_requests(plan, [node(1, 2e9), node(8, 3e9)])
    assert requests["gptq"] == {"num_cpus": 2, "num_gpus": 0, "memory": 3_000_000_000}  # threads 2; capped at the largest node's
    with pytest.raises(UserInputError, match="has a CPU"):
        resource_requests(plan, [node(0, 8e9)])

    cuda = _recipe(tmp_path / "cuda", model)
    data = {**TINY_RECIPE, "source": {"kind": "local", "path": str(model)}}
    write_recipe(cuda.parent, {**data, "verify": {**data["verify"], "devices": ["cpu", "cuda"]}})
    plan = build_plan(load_recipe(cuda))
    assert resource_requests(plan, [node(2, 8e9, gpus=1)])["verify"]["num_gpus"] == 1
    assert resource_requests(plan, [node(2, 8e9, gpus=1)])["gptq"]["num_gpus"] == 0
    with pytest.raises(UserInputError, match="no node of the Ray cluster has a GPU"):
        resource_requests(plan, [node(2, 8e9)])
    # resources.device cuda: the torch stages (imatrix, gptq) take a GPU, the others none
    write_recipe(cuda.parent, {**data, "resources": {"device": "cuda"}})
    requests = resource_requests(build_plan(load_recipe(cuda)), [node(2, 8e9, gpus=1)])
    assert {name for name, r in requests.items() if r["num_gpus"]} == {"gptq", "imatrix"}
