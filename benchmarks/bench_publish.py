"""Publishing a finished release with the git target to a local LFS server: a first push and a no-op second one.

The server is the tests' giftless on 127.0.0.1 (tests/lfs_helpers.py); the remote is a bare repository (file://),
and git-lfs finds the server through ``lfs.url`` (GIT_CONFIG_COUNT). Both pushes share one work directory, as two
``quantmill run`` would. Per push: wall time of ``publish_release`` (its sha256 check of the release included), LFS
objects and bytes uploaded (PUTs the server accepted), LFS requests, growth of the bare repository on disk (the plain
git objects: pointers, cards, configs, tokenizers), commits created, branches. The second push must upload nothing
and create no commit (exit 1 otherwise).

    .venv/bin/python benchmarks/bench_publish.py --release /tmp/after-release/release
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from lfs_helpers import giftless, lfs_missing  # noqa: E402

from quantmill.publish import check_release, publish_release  # noqa: E402
from quantmill.recipe import GitTarget  # noqa: E402


def _git(remote: Path, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", str(remote), *args], check=True, capture_output=True, text=True).stdout


def _disk(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", type=Path, default=Path("/tmp/after-release/release"), help="a finished release")
    args = parser.parse_args()
    if not (args.release / "manifest.json").is_file():
        sys.exit(f"{args.release}: no release here; build the default one with "
                 f"`QUANTMILL_CACHE=... .venv/bin/quantmill default-release --out {args.release.parent}`")
    if reason := lfs_missing():
        sys.exit(reason)
    load = lambda: " ".join(f"{x:.2f}" for x in os.getloadavg())  # noqa: E731
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, load average before: {load()}")
    started = time.perf_counter()
    check_release(args.release)
    print(f"sha256 check of the release alone: {time.perf_counter() - started:.2f} s\n")
    print("| push | wall s | LFS objects | LFS MB uploaded | LFS requests | git KB (bare repo growth) | commits created "
          "| branches | statuses |\n|---|---:|---:|---:|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory(prefix="bench_publish_", dir=args.release.parent) as tmp, giftless(Path(tmp) / "lfs") as server:
        remote = Path(tmp) / "remote.git"
        subprocess.run(["git", "init", "--quiet", "--bare", str(remote)], check=True)
        os.environ.update(GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0="lfs.url", GIT_CONFIG_VALUE_0=server.url("bench", "release"))
        target = GitTarget(url=remote.as_uri())
        sent: list[tuple[int, int]] = []  # (LFS bytes, commits) per push
        for push in ("first", "no-op second"):
            seen, size, commits = len(server.requests()), _disk(remote), int(_git(remote, "rev-list", "--all", "--count"))
            started = time.perf_counter()
            records = publish_release(args.release, [target], work_dir=Path(tmp) / "work")
            seconds, requests = time.perf_counter() - started, server.requests()[seen:]
            puts = [r for r in requests if r["method"] == "PUT" and r["status"] == 200]
            sent.append((sum(r["bytes"] for r in puts), int(_git(remote, "rev-list", "--all", "--count")) - commits))
            statuses = ", ".join(f"{r['branch']}: {r['status']}" for r in records)
            print(f"| {push} | {seconds:.2f} | {len(puts)} | {sent[-1][0] / 1e6:.1f} | {len(requests)} | "
                  f"{(_disk(remote) - size) / 1e3:.1f} | {sent[-1][1]} | {len(_git(remote, 'for-each-ref', 'refs/heads').splitlines())} "
                  f"| {statuses} |")
    print(f"\nload average after: {load()}")
    if sent[1] != (0, 0):
        sys.exit(f"the second push was not a no-op: {sent[1][0]} LFS bytes, {sent[1][1]} commit(s)")


if __name__ == "__main__":
    main()
