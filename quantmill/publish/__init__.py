"""Publishing a finished release: to any git remote, or to the Hugging Face Hub.

Both targets publish the same layout (:mod:`quantmill.publish.layout`): GGUF files and their card
on ``main`` of the GGUF repository, one branch per GPTQ variant with its own card. Before anything
is sent, every file of the release is checked against its manifest sha256, and a release whose
verification failed is refused unless ``force``. Publishing again sends only what differs.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from quantmill.errors import InputFileError, VerificationFailed
from quantmill.manifest import MANIFEST, compare_files, file_records, read_manifest
from quantmill.publish.git import publish_git
from quantmill.publish.hub import publish_hub

# target kind -> publish(target, release_dir, manifest, work_dir, **kwargs) -> records
PUBLISHERS: dict[str, Callable[..., list[dict[str, Any]]]] = {"git": publish_git, "hub": publish_hub}


class PublishBlockedError(VerificationFailed):
    """Verification failed; nothing is published without --force (exit code 1, as verify's)."""


def check_release(release_dir: Path) -> dict[str, Any]:
    """The release's manifest, after checking every file against it."""
    manifest = read_manifest(release_dir / MANIFEST)
    bad = [c for c in compare_files(manifest["outputs"], file_records(release_dir)) if c.status != "identical"]
    if bad:
        raise InputFileError(release_dir / bad[0].path, f"{bad[0].status} compared with the manifest "
                             f"({len(bad)} file(s) differ)", "re-run `quantmill run` to rebuild the release")
    return manifest


def check_verification(manifest: dict[str, Any], force: bool) -> list[str]:
    """Names of the artifacts that failed verification; raises unless ``force``."""
    report = manifest.get("verification") or {"artifacts": []}
    failed = [a["name"] for a in report["artifacts"] if a.get("passed") is False]
    if failed and not force:
        raise PublishBlockedError(
            f"verification failed for {', '.join(failed)}; nothing was published. See verify/report.md in the "
            "release; fix the recipe, or pass --force to publish anyway")
    return failed


def publish_release(release_dir: Path, targets: Sequence[Any], *, work_dir: Path, force: bool = False,
                    **kwargs: Any) -> list[dict[str, Any]]:
    """Publish ``release_dir`` to every target in order; return one record per repository branch."""
    manifest = check_release(Path(release_dir))
    check_verification(manifest, force)
    records: list[dict[str, Any]] = []
    for target in targets:
        records += PUBLISHERS[target.kind](target, Path(release_dir), manifest, Path(work_dir), **kwargs)
    return records
