"""Publish to any git remote with the git command line and git-lfs, one commit per branch that changed.

Trees are built from the release files alone (``git hash-object`` + ``git mktree`` in a scratch
repository under the work directory, no checkout), so a branch holds exactly the planned files.
Model files (``*.safetensors``, ``*.gguf``, ... and any file over :data:`LFS_THRESHOLD` bytes) go in
as git-lfs pointers, with a ``.gitattributes`` as the Hub writes it; their contents are linked into
the scratch repository's LFS store and sent with ``git lfs push`` *before* the branch ref is pushed,
so a ref never names an object the LFS server lacks. git-lfs asks the server first (the batch API)
and sends only the objects it does not have: a push that broke off resumes with what is missing.

The LFS endpoint is git-lfs's own: derived from an http(s) remote (``URL.git/info/lfs``, as on the
Hub and other forges), the remote repository itself for a ``file://`` or local path remote, or
``lfs.url`` from git's configuration (``git config``, ``GIT_CONFIG_COUNT``/``GIT_CONFIG_KEY_0``...)
or the target's ``lfs_url`` when the recipe has one.

A branch whose remote tree already equals the planned tree is left alone (its LFS objects are still
checked with the server, which sends nothing when it has them): publishing again is a no-op, and a
publish interrupted half-way finishes the remaining branches on the next run.
Pushes are fast-forward only: a remote branch that moved since is an error, never overwritten.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from quantmill.errors import ToolError, UserInputError
from quantmill.publish.layout import RepoBranch, plan_branches
from quantmill.recipe import GitTarget
from quantmill.redact import redact

SCRATCH_DIR = "publish/git"
IDENTITY = {"GIT_AUTHOR_NAME": "quantmill", "GIT_AUTHOR_EMAIL": "quantmill@localhost",
            "GIT_COMMITTER_NAME": "quantmill", "GIT_COMMITTER_EMAIL": "quantmill@localhost"}
ATTRIBUTES = ".gitattributes"
LFS_ATTRIBUTES = "filter=lfs diff=lfs merge=lfs -text"
# Tracked by pattern, as in the Hub's default .gitattributes (the model formats quantmill writes first).
LFS_PATTERNS = ("*.safetensors", "*.gguf", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx")
LFS_THRESHOLD = 10 * 1000 * 1000  # bytes; a larger file of any name goes to LFS too (the Hub's 10 MB rule)
POINTER_VERSION = "https://git-lfs.github.com/spec/v1"


def _env() -> dict[str, str]:
    return {**os.environ, **IDENTITY, "GIT_TERMINAL_PROMPT": "0"}


def _git(repo: Path, *args: str, stdin: str | None = None, check: bool = True) -> str:
    result = subprocess.run(["git", "-C", str(repo), *args], input=stdin, capture_output=True, text=True, env=_env(),
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


# --------------------------------------------------------------------------- LFS


def lfs_paths(planned: RepoBranch, threshold: int | None = None) -> list[str]:
    """The branch's files stored in LFS: a model pattern, or over ``threshold`` bytes (cards stay plain git)."""
    limit = LFS_THRESHOLD if threshold is None else threshold
    return sorted(path for path, local in planned.files.items()
                  if any(fnmatch.fnmatch(path, p) for p in LFS_PATTERNS) or local.stat().st_size > limit)


def gitattributes(lfs: list[str]) -> str:
    """``.gitattributes`` as the Hub writes it: the patterns, then one line per large file they miss."""
    lines = [f"{pattern} {LFS_ATTRIBUTES}" for pattern in LFS_PATTERNS]
    lines += [f"{path} {LFS_ATTRIBUTES}" for path in lfs if not any(fnmatch.fnmatch(path, p) for p in LFS_PATTERNS)]
    return "\n".join(lines) + "\n"


def pointer(oid: str, size: int) -> str:
    """A git-lfs pointer file (spec v1)."""
    return f"version {POINTER_VERSION}\noid sha256:{oid}\nsize {size}\n"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _store(repo: Path, local: Path) -> tuple[str, int]:
    """Put ``local`` into the scratch repository's LFS store (a hard link where it can); its (oid, size)."""
    oid, size = _sha256(local), local.stat().st_size
    target = repo / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
    if target.is_file() and target.stat().st_size == size:
        return oid, size
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{oid}.partial")
    partial.unlink(missing_ok=True)
    try:
        os.link(local, partial)
    except OSError:  # another file system, or no hard links here
        shutil.copyfile(local, partial)
    os.replace(partial, target)
    return oid, size


def _lfs_remote(url: str) -> str:
    """git-lfs needs a URL: a local path remote becomes ``file://``."""
    if "://" not in url and Path(url).exists():
        return Path(url).resolve().as_uri()
    return url


def _lfs_push(repo: Path, url: str, oids: list[str], lfs_url: str | None) -> None:
    """Send the objects the LFS server lacks (git-lfs asks it first); raise if any did not arrive."""
    if not oids:
        return
    if shutil.which("git-lfs") is None:
        raise ToolError("git-lfs is not installed; the git target stores model files in LFS. Install it "
                        "(Debian/Ubuntu: apt-get install git-lfs)")
    config = ["-c", f"lfs.url={lfs_url}"] if lfs_url else []
    result = subprocess.run(["git", "-C", str(repo), *config, "lfs", "push", "--object-id", _lfs_remote(url),
                             *sorted(set(oids))], capture_output=True, text=True, env=_env(), check=False)
    if result.returncode != 0:
        message = [line for line in (result.stderr or result.stdout).strip().splitlines() if line.strip()]
        raise ToolError(redact(f"git lfs push failed: {message[-1] if message else 'no output'}"))


# --------------------------------------------------------------------------- branches


def _tree(repo: Path, planned: RepoBranch) -> tuple[str, list[str]]:
    """The branch's tree and the LFS oids it points to."""
    lfs = set(lfs_paths(planned))
    texts = dict(planned.texts)
    if lfs:
        texts[ATTRIBUTES] = gitattributes(sorted(lfs))
    oids, entries = [], []
    for path in sorted({*planned.files, *texts}):
        if path in texts:
            blob = _git(repo, "hash-object", "-w", "--stdin", stdin=texts[path])
        elif path in lfs:
            oid, size = _store(repo, planned.files[path])
            oids.append(oid)
            blob = _git(repo, "hash-object", "-w", "--stdin", stdin=pointer(oid, size))
        else:
            blob = _git(repo, "hash-object", "-w", "--", str(planned.files[path]))
        entries.append(f"100644 blob {blob}\t{path}")
    return _git(repo, "mktree", stdin="\n".join(entries) + "\n"), oids


def push_branch(repo: Path, url: str, planned: RepoBranch, message: str, lfs_url: str | None = None) -> str:
    """Make ``planned`` the tree of ``url``'s branch; return "created", "updated" or "unchanged".

    LFS objects go first, the ref after them.
    """
    head = _remote_head(repo, url, planned.branch)
    tree, oids = _tree(repo, planned)
    _lfs_push(repo, url, oids, lfs_url)
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
    lfs_url = target.lfs_url  # git's own lfs.url when unset
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
        status = push_branch(repo, branch.repo, branch, message, lfs_url)
        files = sorted({*branch.paths(), *([ATTRIBUTES] if lfs_paths(branch) else [])})
        records.append({"target": "git", "repo": redact(branch.repo), "branch": branch.branch, "status": status,
                        "files": files, "lfs": lfs_paths(branch)})
    return records
