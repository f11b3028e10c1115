"""Publishing a release: to a real local bare git repository end to end, and to the Hub through
:class:`quantmill.publish.hub.HubClient`, against an in-memory model of Hub repositories whose end state
the tests check (no network here).

The release is built once per module by the real pipeline on a tiny model (GPTQ: two branches,
GGUF: the f16 file, verify with a threshold).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from release_helpers import TINY_RECIPE, make_tiny_model, write_recipe

from quantmill.cli import main
from quantmill.publish import PublishBlockedError, publish_release
from quantmill.recipe import HubTarget
from quantmill.recipe_load import load_recipe

pytestmark = pytest.mark.slow
BRANCH_4 = "gptq-4bit-32g-actorder_True"
BRANCH_8 = "gptq-8bit--1g-actorder_True"
SECRET = "hf_SECRET_token_for_tests_0123456789"


def _git(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _bare(path: Path) -> Path:
    _git("init", "--quiet", "--bare", str(path))
    return path


def _heads(remote: Path) -> dict[str, str]:
    out = _git("ls-remote", "--heads", str(remote))
    return {line.split()[1].removeprefix("refs/heads/"): line.split()[0] for line in out.splitlines()}


def _files(remote: Path, branch: str) -> dict[str, str]:
    """path -> sha256 of every file on ``branch``; an LFS pointer's object is read from the remote's LFS
    store (git-lfs keeps a ``file://`` remote's objects there); .gitattributes: tests/publish/test_publish_lfs.py."""
    names = _git("--git-dir", str(remote), "ls-tree", "-r", "--name-only", branch).splitlines()
    out = {}
    for name in (n for n in names if n != ".gitattributes"):
        data = subprocess.run(["git", "--git-dir", str(remote), "cat-file", "blob", f"{branch}:{name}"],
                              check=True, capture_output=True).stdout
        if data.startswith(b"version https://git-lfs.github.com/spec/v1\n"):
            oid = data.split(b"oid sha256:")[1].split()[0].decode()
            data = (remote / "lfs" / "objects" / oid[:2] / oid[2:4] / oid).read_bytes()
        out[name] = hashlib.sha256(data).hexdigest()
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


RECIPE: dict[str, Any] = {**TINY_RECIPE, "gguf": {"base": "f16", "types": [], "vocab_pre": "smollm"}}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with the tiny model and a finished release under root/work/release."""
    from quantmill.pipeline.runner import run_recipe

    root = tmp_path_factory.mktemp("publish")
    make_tiny_model(root / "model")
    run_recipe(load_recipe(write_recipe(root, RECIPE)))
    return root


def _release(root: Path) -> Path:
    return root / "work" / "release"


def _run(root: Path, publish: list[dict[str, Any]], *extra: str, **changes: Any) -> int:
    recipe = write_recipe(root, RECIPE, name="publish.yaml", publish=publish, **changes)
    return main(["run", str(recipe), *extra])


def test_git_remote_ends_with_exactly_the_expected_branches_files_and_cards(built: Path, tmp_path: Path) -> None:
    remote = _bare(tmp_path / "remote.git")
    assert _run(built, [{"kind": "git", "url": str(remote)}]) == 0
    heads = _heads(remote)
    assert set(heads) == {"main", BRANCH_4, BRANCH_8}
    release = _release(built)
    main_files = _files(remote, "main")
    assert set(main_files) == {"README.md", "parity.png", "tiny-F16.gguf"}
    assert main_files["tiny-F16.gguf"] == _sha(release / "gguf" / "tiny-F16.gguf")
    assert main_files["README.md"] == _sha(release / "gguf" / "README.md")
    for branch in (BRANCH_4, BRANCH_8):
        files = _files(remote, branch)
        local = release / "gptq" / branch
        assert set(files) == {p.name for p in local.iterdir()}
        assert {n for n in files} >= {"model.safetensors", "config.json", "quantize_config.json", "tokenizer.json", "README.md"}
        for name, sha in files.items():
            if name != "README.md":  # one repository: no variant is renamed to main, so the card says so
                assert sha == _sha(local / name), name
        card = subprocess.run(["git", "--git-dir", str(remote), "show", f"{branch}:README.md"], check=True,
                              capture_output=True, text=True).stdout
        assert f"This branch: `{branch}`" in card and "base_model_relation: quantized" in card
        assert f"| [{BRANCH_4}](" in card and f"| [{BRANCH_8}](" in card and "/tree/main)" not in card
        assert _git("--git-dir", str(remote), "rev-list", "--count", branch) == "1"
    gguf_card = (release / "gguf" / "README.md").read_text(encoding="utf-8")
    assert "| [tiny-F16.gguf](" in gguf_card and "## Parity with the fp16 reference" in gguf_card
    # publishing again changes nothing: same heads, no new commits
    assert _run(built, [{"kind": "git", "url": str(remote)}]) == 0
    assert _heads(remote) == heads


def test_git_gptq_remote_of_its_own_has_the_main_variant_on_main(built: Path, tmp_path: Path) -> None:
    gguf, gptq = _bare(tmp_path / "gguf.git"), _bare(tmp_path / "gptq.git")
    assert _run(built, [{"kind": "git", "url": str(gguf), "gptq_url": str(gptq)}]) == 0
    assert set(_heads(gguf)) == {"main"} and set(_heads(gptq)) == {"main", BRANCH_8}
    assert _files(gptq, "main")["model.safetensors"] == _sha(_release(built) / "gptq" / BRANCH_4 / "model.safetensors")
    card = _git("--git-dir", str(gptq), "show", "main:README.md")
    assert card == (_release(built) / "gptq" / BRANCH_4 / "README.md").read_text(encoding="utf-8").strip()


def test_interrupted_git_publish_resumes_without_duplicates(built: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    remote = _bare(tmp_path / "remote.git")
    hook = remote / "hooks" / "pre-receive"
    hook.write_text(f"#!/bin/sh\ngrep -q refs/heads/{BRANCH_8} && [ -e {tmp_path}/refuse ] && exit 1\nexit 0\n")
    hook.chmod(0o755)
    (tmp_path / "refuse").touch()
    assert _run(built, [{"kind": "git", "url": str(remote)}]) == 1  # the remote refuses the second branch
    assert "git push failed" in capsys.readouterr().err
    first = _heads(remote)
    assert set(first) == {BRANCH_4}
    (tmp_path / "refuse").unlink()
    assert _run(built, [{"kind": "git", "url": str(remote)}, ], "--json") == 0
    records = {r["branch"]: r["status"] for r in json.loads(capsys.readouterr().out)["published"]}
    assert records == {BRANCH_4: "unchanged", BRANCH_8: "created", "main": "created"}
    assert _heads(remote)[BRANCH_4] == first[BRANCH_4]
    assert set(_heads(remote)) == {"main", BRANCH_4, BRANCH_8}


def test_failing_verification_blocks_publish_unless_forced(built: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    remote = _bare(tmp_path / "remote.git")
    strict = {**RECIPE["verify"], "thresholds": {"max_delta_ppl_pct": 0.0}}
    target = [{"kind": "git", "url": str(remote)}]
    assert _run(built, target, verify=strict, output="strict") == 1
    err = capsys.readouterr().err
    report = json.loads((built / "work" / "strict" / "verify" / "verify.json").read_text(encoding="utf-8"))
    failed = [a["name"] for a in report["artifacts"] if a.get("passed") is False]
    assert report["passed"] is False and failed
    assert f"verification failed for {', '.join(failed)}" in err and "--force" in err
    assert _heads(remote) == {}  # nothing at all was pushed
    assert _run(built, [], verify=strict, output="strict") == 1  # no target: the run itself reports the failure
    assert "the release is built" in capsys.readouterr().err
    assert _run(built, target, "--force", verify=strict, output="strict") == 0
    assert set(_heads(remote)) == {"main", BRANCH_4, BRANCH_8}


# --------------------------------------------------------------------------- the Hub


class InMemoryHub:
    """A model of Hub repositories (a :class:`quantmill.publish.hub.HubClient`): branches of files.

    As on the Hub: a new repository's ``main`` holds ``.gitattributes``; a new branch starts as a copy of
    ``main``; a commit applies all its operations or none; deleting a missing file is an error; binaries
    are stored in LFS (the tree lists their sha256). The tests look at what the repositories hold at the
    end, not at the order of the calls that got there; ``calls`` is kept only to show two orders differ.
    """

    LFS_SUFFIXES = (".gguf", ".safetensors", ".png")

    def __init__(self, fail_commit_number: int | None = None) -> None:
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}
        self.private: dict[str, bool | None] = {}
        self.commits: list[tuple[str, str]] = []
        self.calls: list[tuple[str, str, str | None]] = []
        self.fail_commit_number = fail_commit_number

    def create_repo(self, repo_id: str, *, private: bool | None = None, repo_type: str | None = None,
                    exist_ok: bool = False) -> str:
        assert repo_type in (None, "model")
        self.calls.append(("create_repo", repo_id, None))
        if repo_id in self.repos and not exist_ok:
            raise FileExistsError(f"409: {repo_id} exists")
        if repo_id not in self.repos:
            self.repos[repo_id], self.private[repo_id] = {"main": {".gitattributes": b"*.gguf filter=lfs\n"}}, private
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id: str, *, branch: str, repo_type: str | None = None, exist_ok: bool = False) -> None:
        self.calls.append(("create_branch", repo_id, branch))
        branches = self.repos[repo_id]  # KeyError: the repository does not exist
        if branch in branches and not exist_ok:
            raise FileExistsError(f"409: {repo_id}@{branch} exists")
        branches.setdefault(branch, dict(branches["main"]))

    def list_repo_tree(self, repo_id: str, *, recursive: bool = False, revision: str | None = None,
                       repo_type: str | None = None) -> list[Any]:
        from huggingface_hub.hf_api import RepoFile

        self.calls.append(("list_repo_tree", repo_id, revision))
        files = self.repos[repo_id][revision or "main"]
        return [RepoFile(**self._entry(path, data)) for path, data in sorted(files.items())]

    def create_commit(self, repo_id: str, operations: Any, *, commit_message: str, repo_type: str | None = None,
                      revision: str | None = None) -> None:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        self.calls.append(("create_commit", repo_id, revision))
        files = dict(self.repos[repo_id][revision or "main"])
        for op in operations:
            if isinstance(op, CommitOperationAdd):
                source = op.path_or_fileobj
                files[op.path_in_repo] = source if isinstance(source, bytes) else Path(str(source)).read_bytes()
            else:
                assert isinstance(op, CommitOperationDelete)
                del files[op.path_in_repo]  # KeyError: the Hub refuses to delete a missing file
        if self.fail_commit_number is not None and len(self.commits) + 1 == self.fail_commit_number:
            self.fail_commit_number = None
            raise ConnectionError("connection reset by peer")
        self.repos[repo_id][revision or "main"] = files
        self.commits.append((repo_id, revision or "main"))

    @classmethod
    def _entry(cls, path: str, data: bytes) -> dict[str, Any]:
        entry: dict[str, Any] = {"path": path, "size": len(data), "type": "file",
                                 "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
        if path.endswith(cls.LFS_SUFFIXES):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def state(self) -> dict[str, dict[str, dict[str, str]]]:
        """repository -> branch -> path -> sha256: everything a user of the repositories can see."""
        return {repo: {branch: {path: hashlib.sha256(data).hexdigest() for path, data in sorted(files.items())}
                       for branch, files in sorted(branches.items())} for repo, branches in sorted(self.repos.items())}


def _hub_target(**changes: Any) -> HubTarget:
    return HubTarget(**{"gguf_repo": "me/tiny-GGUF", "gptq_repo": "me/tiny-GPTQ", **changes})


def _publish_hub(built: Path, hub: InMemoryHub, **changes: Any) -> list[dict[str, Any]]:
    return publish_release(_release(built), [_hub_target(**changes)], work_dir=built / "work", hf_api=hub)


@pytest.fixture(scope="module")
def published(built: Path) -> dict[str, dict[str, dict[str, str]]]:
    """The end state of one uninterrupted publish to an empty Hub."""
    hub = InMemoryHub()
    _publish_hub(built, hub)
    return hub.state()


def test_hub_publish_ends_with_the_release_on_its_branches_and_no_token(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    hub = InMemoryHub()
    records = _publish_hub(built, hub, private=True)
    release = _release(built)
    state = hub.state()
    assert sorted(state) == ["me/tiny-GGUF", "me/tiny-GPTQ"] and set(hub.private.values()) == {True}
    gguf_main = state["me/tiny-GGUF"]["main"]
    assert sorted(state["me/tiny-GGUF"]) == ["main"]
    assert sorted(gguf_main) == [".gitattributes", "README.md", "parity.png", "tiny-F16.gguf"]
    for name in ("parity.png", "tiny-F16.gguf"):
        assert gguf_main[name] == _sha(release / "gguf" / name), name
    # the GPTQ repository of its own: the main variant on main, the other on its branch, each with its card
    assert sorted(state["me/tiny-GPTQ"]) == [BRANCH_8, "main"]
    for branch, local in (("main", BRANCH_4), (BRANCH_8, BRANCH_8)):
        files = state["me/tiny-GPTQ"][branch]
        assert sorted(files) == sorted({".gitattributes", *(p.name for p in (release / "gptq" / local).iterdir())})
        for name, sha in files.items():
            if name not in (".gitattributes", "README.md"):
                assert sha == _sha(release / "gptq" / local / name), (branch, name)
        card = hub.repos["me/tiny-GPTQ"][branch]["README.md"].decode()
        assert f"This branch: `{branch}`" in card and "huggingface.co/me/tiny-GPTQ/tree/" in card
    tree = {e.path: e for e in hub.list_repo_tree("me/tiny-GGUF", revision="main")}
    assert tree["tiny-F16.gguf"].lfs.sha256 == _sha(release / "gguf" / "tiny-F16.gguf")  # stored in LFS
    assert hub.repos["me/tiny-GGUF"]["main"][".gitattributes"] == b"*.gguf filter=lfs\n"  # the Hub's own, kept
    assert [(r["repo"], r["branch"], r["status"]) for r in records] == [
        ("me/tiny-GPTQ", BRANCH_8, "created"), ("me/tiny-GPTQ", "main", "created"), ("me/tiny-GGUF", "main", "created")]
    for repo, branches in hub.repos.items():  # the token is in no file sent
        assert all(SECRET.encode() not in data for files in branches.values() for data in files.values()), repo
    for path in [*built.rglob("*")]:  # nor written anywhere locally
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert SECRET.encode() not in path.read_bytes(), path


def test_hub_publish_again_changes_nothing(built: Path, published: dict[str, Any]) -> None:
    hub = InMemoryHub()
    _publish_hub(built, hub)
    commits = list(hub.commits)
    records = _publish_hub(built, hub)
    assert hub.state() == published and hub.commits == commits
    assert {r["status"] for r in records} == {"unchanged"}


def test_the_same_end_state_through_another_order_of_calls(built: Path, published: dict[str, Any]) -> None:
    """Not an order of calls: a Hub someone prepared (the branch exists, GGUF published on its own first)
    ends in the same state as an empty Hub published in one go."""
    hub = InMemoryHub()
    hub.create_repo("me/tiny-GPTQ")
    hub.create_branch("me/tiny-GPTQ", branch=BRANCH_8)
    _publish_hub(built, hub, gptq_repo=None)
    _publish_hub(built, hub, gguf_repo=None)
    _publish_hub(built, hub)
    once = InMemoryHub()
    _publish_hub(built, once)
    assert hub.calls != once.calls  # really another order
    assert hub.state() == published == once.state()


def test_interrupted_hub_publish_resumes_to_the_same_end_state(built: Path, published: dict[str, Any]) -> None:
    hub = InMemoryHub(fail_commit_number=2)
    with pytest.raises(ConnectionError):
        _publish_hub(built, hub)
    assert hub.commits == [("me/tiny-GPTQ", BRANCH_8)]  # the failed commit left nothing behind
    assert hub.repos["me/tiny-GPTQ"]["main"].keys() == {".gitattributes"}
    _publish_hub(built, hub)
    assert hub.state() == published
    assert sorted(hub.commits) == sorted(set(hub.commits))  # one commit per branch: nothing was sent twice


def test_hub_branch_left_with_stray_files_is_cleaned(built: Path, published: dict[str, Any]) -> None:
    hub = InMemoryHub()
    _publish_hub(built, hub)
    hub.repos["me/tiny-GPTQ"][BRANCH_8]["stale.bin"] = b"old"
    hub.repos["me/tiny-GPTQ"][BRANCH_8]["config.json"] = b"{}"
    _publish_hub(built, hub)
    assert hub.state() == published
    assert hub.commits.count(("me/tiny-GPTQ", BRANCH_8)) == 2 and len(hub.commits) == 4


def test_failing_verification_touches_no_hub_repository(built: Path) -> None:
    hub = InMemoryHub()
    release = built / "work" / "strict"
    if not release.is_dir():
        pytest.skip("needs the strict release of test_failing_verification_blocks_publish_unless_forced")
    with pytest.raises(PublishBlockedError):
        publish_release(release, [_hub_target()], work_dir=built / "work", hf_api=hub)
    assert hub.state() == {} and hub.calls == []


def test_tampered_release_is_never_published(built: Path, tmp_path: Path) -> None:
    copy = tmp_path / "release"
    shutil.copytree(_release(built), copy)
    with open(copy / "gguf" / "tiny-F16.gguf", "r+b") as fh:
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 1]))
    hub = InMemoryHub()
    with pytest.raises(Exception, match="different compared with the manifest"):
        publish_release(copy, [_hub_target()], work_dir=tmp_path, hf_api=hub)
    assert hub.state() == {}


def test_files_over_the_limit_go_up_in_llama_cpp_split_format(built: Path, tmp_path: Path) -> None:
    import gguf
    import llama_cpp

    release = _release(built)
    original = release / "gguf" / "tiny-F16.gguf"
    hub = InMemoryHub()
    limit = original.stat().st_size // 2
    publish_release(release, [_hub_target(gptq_repo=None, max_file_size=limit)], work_dir=tmp_path, hf_api=hub)
    names = sorted(hub.repos["me/tiny-GGUF"]["main"])
    shards = [n for n in names if n.startswith("tiny-F16-")]
    assert len(shards) >= 2 and "tiny-F16.gguf" not in names
    assert shards[0] == f"tiny-F16-00001-of-{len(shards):05d}.gguf"
    split_dir = next((tmp_path / "publish" / "split").iterdir())
    assert all((split_dir / s).stat().st_size <= limit for s in shards)
    whole = gguf.GGUFReader(original)
    parts = [gguf.GGUFReader(split_dir / s) for s in shards]
    assert int(parts[0].fields["split.count"].contents()) == len(shards)
    split_tensors = {t.name: bytes(t.data.tobytes()) for p in parts for t in p.tensors}
    assert split_tensors == {t.name: bytes(t.data.tobytes()) for t in whole.tensors}
    model = llama_cpp.Llama(str(split_dir / shards[0]), n_ctx=64, verbose=False)  # llama.cpp loads the set
    assert model.n_vocab() == 400
    model.close()
