"""Publish to the Hugging Face Hub through ``huggingface_hub.HfApi``.

Per repository: ``create_repo(exist_ok=True)``; per branch: ``create_branch(exist_ok=True)`` (not for
``main``), ``list_repo_tree`` to see what is there, then ONE ``create_commit`` that adds the files
whose sha256 (LFS) or git blob id differ and deletes files that do not belong (``.gitattributes``
is kept), or no commit at all when the branch already matches. GGUF files larger than the target's
``max_file_size`` are uploaded in llama.cpp's split format instead. ``create_commit`` uploads the LFS files
first and the Hub keeps each one it received, so a commit that broke off re-sends only what is missing
(huggingface_hub 2 has no separate large-folder uploader: it was removed in favour of this path).

Everything quantmill asks of the Hub is :class:`HubClient`; ``HfApi`` is one (checked by mypy below), and the
tests use an in-memory Hub that keeps files per branch.

The token is whatever huggingface_hub finds (``HF_TOKEN`` or the stored login); quantmill never
reads, passes, logs or writes it.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from quantmill.publish.layout import RepoBranch, plan_branches
from quantmill.recipe import HubTarget

KEEP = (".gitattributes",)
SPLIT_DIR = "publish/split"


class HubClient(Protocol):
    """The four ``HfApi`` calls a publish makes (keyword names as huggingface_hub's)."""

    def create_repo(self, repo_id: str, *, private: bool | None = None, repo_type: str | None = None,
                    exist_ok: bool = False) -> Any: ...

    def create_branch(self, repo_id: str, *, branch: str, repo_type: str | None = None, exist_ok: bool = False) -> None: ...

    def list_repo_tree(self, repo_id: str, *, recursive: bool = False, revision: str | None = None,
                       repo_type: str | None = None) -> Iterable[Any]: ...

    def create_commit(self, repo_id: str, operations: Iterable[Any], *, commit_message: str,
                      repo_type: str | None = None, revision: str | None = None) -> Any: ...


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _file_ids(path: Path) -> tuple[str, str]:
    """(sha256, git blob sha1) of a local file, streamed."""
    sha256, sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            sha256.update(block)
            sha1.update(block)
    return sha256.hexdigest(), sha1.hexdigest()


def _lfs_sha256(entry: Any) -> str | None:
    lfs = getattr(entry, "lfs", None)
    if lfs is None:
        return None
    return lfs.get("sha256") or lfs.get("oid") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)


def _same(entry: Any, sha256: str, blob_id: str) -> bool:
    return entry is not None and (_lfs_sha256(entry) == sha256 or getattr(entry, "blob_id", None) == blob_id)


def split_oversized(branch: RepoBranch, limit: int, work_dir: Path) -> RepoBranch:
    """Replace every GGUF file over ``limit`` bytes by its llama.cpp split shards."""
    from quantmill.publish.split import split_gguf

    files: dict[str, Path] = {}
    for name, path in branch.files.items():
        if name.endswith(".gguf") and path.stat().st_size > limit:
            for shard in split_gguf(path, work_dir / SPLIT_DIR, limit):
                files[shard.name] = shard
        else:
            files[name] = path
    return RepoBranch(branch.repo, branch.branch, files, branch.texts)


def sync_branch(api: HubClient, planned: RepoBranch, message: str) -> str:
    """Make the Hub branch hold exactly ``planned``; return "created", "updated" or "unchanged"."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.hf_api import RepoFile

    if planned.branch != "main":
        api.create_branch(repo_id=planned.repo, branch=planned.branch, repo_type="model", exist_ok=True)
    remote = {e.path: e for e in api.list_repo_tree(planned.repo, recursive=True, revision=planned.branch,
                                                    repo_type="model") if isinstance(e, RepoFile)}
    operations: list[Any] = []
    for path in planned.paths():
        if path in planned.texts:
            data = planned.texts[path].encode("utf-8")
            if not _same(remote.get(path), hashlib.sha256(data).hexdigest(), git_blob_id(data)):
                operations.append(CommitOperationAdd(path_in_repo=path, path_or_fileobj=data))
        else:
            sha256, blob_id = _file_ids(planned.files[path])
            if not _same(remote.get(path), sha256, blob_id):
                operations.append(CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(planned.files[path])))
    wanted = set(planned.paths())
    operations += [CommitOperationDelete(path_in_repo=p) for p in sorted(remote) if p not in wanted and p not in KEEP]
    if not operations:
        return "unchanged"
    api.create_commit(repo_id=planned.repo, operations=operations, commit_message=message, revision=planned.branch,
                      repo_type="model")
    return "updated" if wanted & set(remote) else "created"


def publish_hub(target: HubTarget, release_dir: Path, manifest: dict[str, Any], work_dir: Path, *,
                hf_api: HubClient | None = None, **_: Any) -> list[dict[str, Any]]:
    if hf_api is None:
        from huggingface_hub import HfApi

        hf_api = HfApi()  # mypy checks here that HfApi is a HubClient
    planned = plan_branches(release_dir, manifest, gguf_repo=target.gguf_repo, gptq_repo=target.gptq_repo)
    for repo in sorted({b.repo for b in planned}):
        hf_api.create_repo(repo_id=repo, repo_type="model", private=target.private, exist_ok=True)
    records = []
    for branch in planned:
        branch = split_oversized(branch, int(target.max_file_size), work_dir)
        message = f"{manifest['name']}: {branch.branch} (recipe {manifest['recipe_sha256'][:12]})"
        status = sync_branch(hf_api, branch, message)
        records.append({"target": "hub", "repo": branch.repo, "branch": branch.branch, "status": status,
                        "files": branch.paths()})
    return records
