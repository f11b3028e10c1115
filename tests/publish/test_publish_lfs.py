"""The git target with git-lfs against a real LFS server on the loopback interface.

The server (tests/lfs_helpers.py) is giftless 0.6.2 (its own venv: scripts/lfs_server.sh) served by waitress on
127.0.0.1, with local storage under the test's tmp_path; the git remote is a bare repository (``file://``) and
the pushing side finds the LFS server through git's ``lfs.url`` (set here with GIT_CONFIG_COUNT).
The helper's WSGI middleware in front of giftless logs every request (method, path, body bytes, status)
and can hold uploads after N objects, so that a test can kill a publish in the middle of its LFS push.

Without git-lfs or the giftless venv these tests skip, unless CI is set: then they fail.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lfs_helpers import LfsServer, giftless, lfs_missing
from release_helpers import write_recipe
from test_publish import BRANCH_4, BRANCH_8, RECIPE, _bare, _heads, _release, _sha, built  # noqa: F401

from quantmill.cli import main
from quantmill.publish.git import LFS_ATTRIBUTES, gitattributes, lfs_paths
from quantmill.publish.layout import RepoBranch

POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1\n"
LFS_FILES = {BRANCH_4: {"model.safetensors"}, BRANCH_8: {"model.safetensors"}, "main": {"tiny-F16.gguf"}}


def _require_lfs() -> None:
    reason = lfs_missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, and scripts/test.sh installs both")
        pytest.skip(reason)


@pytest.fixture
def lfs_server(tmp_path: Path) -> Iterator[LfsServer]:
    """giftless on 127.0.0.1 (waitress), anonymous read/write, local storage; stopped at the end (tests/lfs_helpers.py)."""
    _require_lfs()
    try:
        with giftless(tmp_path / "giftless") as server:
            yield server
    except RuntimeError as error:  # the server did not start
        pytest.fail(str(error))


def _git(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}).stdout.strip()


def _use_lfs_server(monkeypatch: pytest.MonkeyPatch, lfs_url: str) -> dict[str, str]:
    """git's configuration from the environment: the pushing side's lfs.url (no global config touched)."""
    env = {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "lfs.url", "GIT_CONFIG_VALUE_0": lfs_url}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def _publish(root: Path, remote: Path, *extra: str) -> int:
    recipe = write_recipe(root, RECIPE, name="publish-lfs.yaml", publish=[{"kind": "git", "url": str(remote)}])
    return main(["run", str(recipe), *extra])


def _blob(remote: Path, branch: str, path: str) -> bytes:
    return subprocess.run(["git", "--git-dir", str(remote), "cat-file", "blob", f"{branch}:{path}"], check=True,
                          capture_output=True).stdout


def _expected(release: Path, branch: str) -> dict[str, str]:
    """sha256 of every release file a branch carries (the GPTQ cards are re-rendered per repository)."""
    if branch == "main":
        return {p.name: _sha(p) for p in (release / "gguf").iterdir() if p.suffix in (".gguf", ".png", ".md")}
    return {p.name: _sha(p) for p in (release / "gptq" / branch).iterdir() if p.name != "README.md"}


def _uploads(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in requests if r["method"] == "PUT" and r["status"] == 200]


def _traffic(requests: list[dict[str, Any]]) -> str:
    uploads = _uploads(requests)
    batches = [r for r in requests if r["path"].endswith("/objects/batch")]
    kinds: dict[str, int] = {}
    for r in requests:
        kind = f"{r['method']} {'object' if r['method'] in ('PUT', 'GET') else r['path'].rsplit('/', 1)[-1]}"
        kinds[kind] = kinds.get(kind, 0) + 1
    return (f"{len(uploads)} object(s), {sum(r['bytes'] for r in uploads)} bytes uploaded; "
            f"{len(batches)} batch request(s), {sum(r['bytes'] for r in batches)} bytes; "
            f"{len(requests)} request(s) and {sum(r['bytes'] for r in requests)} request-body bytes in all "
            f"({', '.join(f'{k} x{n}' for k, n in sorted(kinds.items()))})")


@pytest.mark.slow
def test_lfs_publish_clones_back_with_the_release_files_and_a_second_push_sends_nothing(
        built: Path, tmp_path: Path, lfs_server: LfsServer, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    lfs_url = lfs_server.url("tests", "tiny")
    _use_lfs_server(monkeypatch, lfs_url)
    remote = _bare(tmp_path / "remote.git")
    release = _release(built)
    started = time.perf_counter()
    assert _publish(built, remote) == 0
    first_s, first = time.perf_counter() - started, lfs_server.requests()
    heads = _heads(remote)
    assert set(heads) == {"main", BRANCH_4, BRANCH_8}

    # the server holds every LFS object, by sha256; the bare remote holds none (only pointers)
    stored = lfs_server.objects("tests", "tiny")
    expected_oids = {_expected(release, b)[name] for b, names in LFS_FILES.items() for name in names}
    assert set(stored) == expected_oids
    assert all(_sha(path) == oid for oid, path in stored.items())
    assert not (remote / "lfs").exists()

    for branch, names in LFS_FILES.items():
        attributes = _blob(remote, branch, ".gitattributes").decode()
        assert f"*.safetensors {LFS_ATTRIBUTES}" in attributes and f"*.gguf {LFS_ATTRIBUTES}" in attributes
        for name in names:  # model files are pointers in git ...
            assert _blob(remote, branch, name).startswith(POINTER_PREFIX), (branch, name)
        for name in _expected(release, branch).keys() - names:  # ... cards, configs, tokenizer stay plain git
            data = _blob(remote, branch, name)
            assert not data.startswith(POINTER_PREFIX), (branch, name)
            if name != "README.md" or branch == "main":
                assert hashlib.sha256(data).hexdigest() == _expected(release, branch)[name], (branch, name)

    # a fresh clone + git lfs pull: every file's sha256 equals the release's, every variant on its branch
    clone = tmp_path / "clone"
    _git("clone", "--quiet", "--branch", "main", remote.as_uri(), str(clone), env={"GIT_LFS_SKIP_SMUDGE": "1"})
    _git("config", "lfs.url", lfs_url, cwd=clone)
    _git("lfs", "install", "--local", cwd=clone)
    monkeypatch.delenv("GIT_CONFIG_COUNT")  # the clone finds the server through its own config
    for branch, names in LFS_FILES.items():
        _git("checkout", "--quiet", branch, cwd=clone)
        _git("lfs", "pull", cwd=clone)
        listed = dict(line.split(" * ")[::-1] for line in _git("lfs", "ls-files", "--long", cwd=clone).splitlines())
        assert set(listed) == names, branch
        files = {p.name: _sha(p) for p in clone.iterdir() if p.is_file()}
        assert set(files) == {*_expected(release, branch), "README.md", ".gitattributes"}
        for name, sha in _expected(release, branch).items():
            assert files[name] == sha, (branch, name)
        assert {listed[name] for name in names} == {files[name] for name in names}
    monkeypatch.setenv("GIT_CONFIG_COUNT", "1")

    # publishing again: the same heads, and not one object sent (git-lfs asks the server first)
    pulled = lfs_server.requests()[len(first):]
    started = time.perf_counter()
    assert _publish(built, remote) == 0
    second_s, second = time.perf_counter() - started, lfs_server.requests()[len(first) + len(pulled):]
    assert _heads(remote) == heads
    assert _uploads(second) == [] and second, "a no-op publish still asks the server, and sends nothing"
    assert len(_uploads(first)) == len(expected_oids)
    assert not [r for r in second if r["method"] != "POST" or not r["path"].endswith("/objects/batch")]
    with capsys.disabled():
        print(f"\n[lfs publish] first push: {first_s:.2f} s, {_traffic(first)}"
              f"\n[lfs publish] clone + git lfs pull: {_traffic(pulled)}"
              f"\n[lfs publish] no-op second push: {second_s:.2f} s, {_traffic(second)}")


@pytest.mark.slow
def test_lfs_push_killed_halfway_resumes_without_resending(built: Path, tmp_path: Path,  # noqa: F811
                                                          lfs_server: LfsServer, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    env = _use_lfs_server(monkeypatch, lfs_server.url("tests", "resume"))
    remote = _bare(tmp_path / "remote.git")
    recipe = write_recipe(built, RECIPE, name="publish-lfs.yaml", publish=[{"kind": "git", "url": str(remote)}])
    (lfs_server.control / "stall_after").write_text("1")  # the server stores one object, then holds uploads
    log = open(tmp_path / "killed-publish.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "quantmill.cli", "run", str(recipe)], cwd=built,
                            env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (lfs_server.control / "stalled").exists():
            assert proc.poll() is None, (f"publish ended ({proc.returncode}) before its push was held:\n"
                                         f"{(tmp_path / 'killed-publish.log').read_text()[-3000:]}")
            assert time.monotonic() < deadline, "the publish never reached its second LFS object"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the publish and its git / git-lfs children, mid-push
        proc.wait()
        log.close()
    (lfs_server.control / "stall_after").unlink()
    killed = lfs_server.requests()
    arrived = lfs_server.objects("tests", "resume")
    assert len(arrived) == 1 and len(_uploads(killed)) == 1
    (oid, path), = arrived.items()
    mtime = path.stat().st_mtime_ns
    assert oid == _sha(_release(built) / "gptq" / BRANCH_4 / "model.safetensors")
    assert set(_heads(remote)) == {BRANCH_4}  # its objects were in, so its ref went; the rest never started

    assert main(["run", str(recipe), "--json"]) == 0
    records = {r["branch"]: r["status"] for r in json.loads(capsys.readouterr().out)["published"]}
    assert records == {BRANCH_4: "unchanged", BRANCH_8: "created", "main": "created"}
    resumed = lfs_server.requests()[len(killed):]
    sent = [r["path"].rsplit("/", 1)[-1] for r in _uploads(resumed)]
    assert oid not in sent and len(set(sent)) == len(sent) == 2  # only what was missing
    assert path.stat().st_mtime_ns == mtime
    assert set(lfs_server.objects("tests", "resume")) == {
        oid, _sha(_release(built) / "gptq" / BRANCH_8 / "model.safetensors"),
        _sha(_release(built) / "gguf" / "tiny-F16.gguf")}
    assert set(_heads(remote)) == {"main", BRANCH_4, BRANCH_8}
    with capsys.disabled():
        print(f"\n[lfs resume] killed run: {_traffic(killed)}\n[lfs resume] re-run: {_traffic(resumed)}")


def test_model_files_and_large_files_go_to_lfs_cards_and_configs_stay_plain(tmp_path: Path) -> None:
    sizes = {"model.safetensors": 10, "tiny-Q4_K_M.gguf": 10, "tokenizer.json": 2_000, "config.json": 500,
             "parity.png": 900}
    files = {}
    for name, size in sizes.items():
        files[name] = tmp_path / name
        files[name].write_bytes(b"x" * size)
    branch = RepoBranch("remote", "main", files, {"README.md": "# card\n" * 1000})
    assert lfs_paths(branch, threshold=1_000) == ["model.safetensors", "tiny-Q4_K_M.gguf", "tokenizer.json"]
    assert lfs_paths(branch) == ["model.safetensors", "tiny-Q4_K_M.gguf"]  # the default threshold is 10 MB
    attributes = gitattributes(lfs_paths(branch, threshold=1_000)).splitlines()
    assert attributes[0] == "*.safetensors filter=lfs diff=lfs merge=lfs -text"
    assert "*.gguf filter=lfs diff=lfs merge=lfs -text" in attributes
    assert attributes[-1] == "tokenizer.json filter=lfs diff=lfs merge=lfs -text"  # a large file by name, as the Hub
    assert not any(line.startswith(("config.json", "README.md", "parity.png")) for line in attributes)


@pytest.mark.slow
def test_target_lfs_url_points_git_lfs_at_the_server_without_git_config(built: Path, tmp_path: Path,  # noqa: F811
                                                                        lfs_server: LfsServer) -> None:
    """A target with ``lfs_url`` (read when the recipe's GitTarget has the field) needs no git configuration."""
    from types import SimpleNamespace

    from quantmill.publish import publish_release

    remote = _bare(tmp_path / "remote.git")
    target = SimpleNamespace(kind="git", url=str(remote), gptq_url=None, lfs_url=lfs_server.url("tests", "field"))
    records = publish_release(_release(built), [target], work_dir=tmp_path / "work")
    assert {r["branch"]: r["lfs"] for r in records} == {b: sorted(n) for b, n in LFS_FILES.items()}
    assert len(lfs_server.objects("tests", "field")) == 3 and not (remote / "lfs").exists()
