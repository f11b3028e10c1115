"""Publish to any git remote with the git command line, one commit per branch that changed.

Trees are built from the release files alone (``git hash-object`` + ``git mktree`` in a scratch
repository under the work directory, no checkout), so a branch holds exactly the planned files.
A branch whose remote tree already equals the planned tree is left alone: publishing again
is a no-op, and a publish interrupted half-way finishes the remaining branches on the next run.
Pushes are fast-forward only: a remote branch that moved since is an error, never overwritten.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

from quantmill.errors import ToolError, UserInputError
from quantmill.redact import redact
from quantmill.publish.layout import RepoBranch, plan_branches
from quantmill.recipe import GitTarget

SCRATCH_DIR = "publish/git"
IDENTITY = {"GIT_AUTHOR_NAME": "quantmill", "GIT_AUTHOR_EMAIL": "quantmill@localhost",
            "GIT_COMMITTER_NAME": "quantmill", "GIT_COMMITTER_EMAIL": "quantmill@localhost"}


def _git(repo: Path, *args: str, stdin: str | None = None, check: bool = True) -> str:
    env = {**os.environ, **IDENTITY, "GIT_TERMINAL_PROMPT": "0"}
    result = subprocess.run(["git", "-C", str(repo), *args], input=stdin, capture_output=True, text=True, env=env,
                            check=False)
    if check and result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise ToolError(redact(f"git {args[0]} failed: {message[-1] if message else 'no output'}"))
    return result.stdout.strip() if result.returncode == 0 else ""


def _scratch(work_dir: Path, url: str) -> Path:
    repo = work_dir / SCRATCH_DIR / hashlib.sha256(url.encode()).hexdigest()[:16]
    if not (repo / "HEAD").is_file():
        repo.mkdir(parents=True, exist_ok=True)
        _git(repo, "init", "--quiet", "--bare")
    return repo


def _remote_head(repo: Path, url: str, branch: str) -> str | None:
    line = _git(repo, "ls-remote", url, f"refs/heads/{branch}")
    if not line:
        return None
    head = line.split()[0]
    _git(repo, "fetch", "--quiet", "--no-tags", url, f"+refs/heads/{branch}:refs/quantmill/{branch}")
    return head


def _tree(repo: Path, planned: RepoBranch) -> str:
    entries = []
    for path in planned.paths():
        if path in planned.texts:
            blob = _git(repo, "hash-object", "-w", "--stdin", stdin=planned.texts[path])
        else:
            blob = _git(repo, "hash-object", "-w", "--", str(planned.files[path]))
        entries.append(f"100644 blob {blob}\t{path}")
    return _git(repo, "mktree", stdin="\n".join(entries) + "\n")


def push_branch(repo: Path, url: str, planned: RepoBranch, message: str) -> str:
    """Make ``planned`` the tree of ``url``'s branch; return "created", "updated" or "unchanged"."""
    head = _remote_head(repo, url, planned.branch)
    tree = _tree(repo, planned)
    if head is not None and _git(repo, "rev-parse", f"{head}^{{tree}}") == tree:
        return "unchanged"
    parents = ["-p", head] if head is not None else []
    commit = _git(repo, "commit-tree", tree, *parents, "-m", message)
    _git(repo, "push", "--quiet", url, f"{commit}:refs/heads/{planned.branch}")
    return "created" if head is None else "updated"


def _check_remote(repo: Path, url: str) -> None:
    result = subprocess.run(["git", "-C", str(repo), "ls-remote", url], capture_output=True, text=True,
                            env={**os.environ, "GIT_TERMINAL_PROMPT": "0"}, check=False)
    if result.returncode != 0:
        raise UserInputError(f"publish git url {redact(url)!r}: not a reachable git repository; create it (git init --bare) "
                             "or fix the url")


def publish_git(target: GitTarget, release_dir: Path, manifest: dict[str, Any], work_dir: Path,
                **_: Any) -> list[dict[str, Any]]:
    gptq_url = target.gptq_url or target.url
    has_gptq = manifest["recipe"].get("gptq") is not None
    has_gguf = manifest["recipe"].get("gguf") is not None
    planned = plan_branches(release_dir, manifest, gguf_repo=target.url if has_gguf else None,
                            gptq_repo=gptq_url if has_gptq else None, hub_ids=False)
    records = []
    for url in sorted({b.repo for b in planned}):
        _check_remote(_scratch(work_dir, url), url)
    for branch in planned:
        repo = _scratch(work_dir, branch.repo)
        message = f"{manifest['name']}: {branch.branch} (recipe {manifest['recipe_sha256'][:12]})"
        status = push_branch(repo, branch.repo, branch, message)
        records.append({"target": "git", "repo": redact(branch.repo), "branch": branch.branch, "status": status,
                        "files": branch.paths()})
    return records
