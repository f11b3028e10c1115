"""Atomic outputs: write under a temporary name in the target directory, then rename.

Nothing half-written is ever visible under the final name; on failure the temporary
file or directory is removed.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from quantmill.errors import OutputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ensure_writable_dir(directory: Path) -> None:
    """Create ``directory`` if needed and check it can be written, or raise OutputError."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"{directory}: cannot create output directory ({exc.strerror}); choose a writable location"
        ) from exc
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputError(f"{directory}: output directory is not writable; choose a writable location")


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it to ``final`` on success."""
    final = Path(final)
    ensure_writable_dir(final.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.chmod(0o666 & ~_umask())  # mkstemp makes 0600; a finished file gets the usual mode
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``final``; it replaces ``final`` on success."""
    final = Path(final)
    ensure_writable_dir(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; a finished directory gets the usual mode
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def refuse_unrelated_dir(final: Path, marker: str, command: str) -> None:
    """An output directory a command may replace: absent, empty, or an earlier output of it (holds ``marker``)."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise OutputError(f"--out {final} is a file; give a directory path")
    if final.is_dir() and any(final.iterdir()) and not (final / marker).is_file():
        raise OutputError(f"--out {final} exists and is not an earlier {command} output; choose a new directory or remove it")


def write_text_atomic(final: Path, text: str) -> None:
    with atomic_file(final) as tmp:
        tmp.write_text(text, encoding="utf-8")
