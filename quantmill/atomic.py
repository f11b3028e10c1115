"""Atomic outputs: write under a temporary name in the target directory, then rename.

Nothing half-written is ever visible under the final name; on failure the temporary
file or directory is removed.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from quantmill.errors import OutputError

_serial = itertools.count()
MAX_NAME_TRIES = 1000


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


def _final(final: Path | str) -> Path:
    """``final`` made absolute (so ``.`` has a real parent), refused when it is a symbolic link."""
    path = Path(os.path.abspath(final))
    if path.is_symlink():
        raise OutputError(f"{final}: is a symbolic link; give a real path or a new name")
    cwd = Path(os.path.realpath(Path.cwd()))
    real = Path(os.path.realpath(path))
    if real == cwd or real in cwd.parents:
        raise OutputError(f"{final}: is the current directory or one above it; name a new output")
    return path


@contextlib.contextmanager
def _translated(final: Path) -> Iterator[None]:
    """OSErrors that mean "cannot write here" (full disk, EFBIG, read-only, denied) become one OutputError."""
    from quantmill.outputs import write_error

    try:
        yield
    except OSError as exc:
        error = write_error(exc, final)
        if error is None:
            raise
        raise error from exc


def temporary_next_to(final: Path, directory: bool = False) -> Path:
    """A new, empty file (or directory) ``.NAME.PID-N.part`` next to ``final``, with the usual mode (umask applied).

    Created exclusively (``O_EXCL``, ``mkdir``): an existing name, or a link under it, is never reused.
    """
    for _ in range(MAX_NAME_TRIES):
        tmp = final.with_name(f".{final.name}.{os.getpid()}-{next(_serial)}.part")
        try:
            if directory:
                tmp.mkdir(0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(f"{final.parent}: cannot create a {'directory' if directory else 'file'} here "
                              f"({exc.strerror}); choose a writable location") from exc
    raise OutputError(f"{final.parent}: {MAX_NAME_TRIES} temporary names next to {final.name} are taken; remove the .part files")


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it to ``final`` on success."""
    final = _final(final)
    ensure_writable_dir(final.parent)
    tmp = temporary_next_to(final)
    try:
        with _translated(final):
            yield tmp
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``final``; it replaces ``final`` on success."""
    final = _final(final)
    ensure_writable_dir(final.parent)
    tmp = temporary_next_to(final, directory=True)
    try:
        with _translated(final):
            yield tmp
            if final.exists():
                if not final.is_dir():
                    raise OutputError(f"{final}: is a file; give a directory path")
                # move the old output aside first (one rename), so only quantmill's own temporary is removed
                old = temporary_next_to(final, directory=True)
                os.replace(final, old / final.name)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def refuse_unrelated_dir(final: Path, marker: str, command: str, inputs: tuple[Path, ...] = ()) -> None:
    """An output directory a command may replace: absent, empty, or an earlier output of it (holds ``marker``).

    The rule itself is :func:`quantmill.outputs.check_output`.
    """
    from quantmill.outputs import check_output
    from quantmill.outputs import marker as has_marker

    check_output(final, kind="dir", flag="--out", command=command, inputs=inputs, owned=has_marker(marker))


def write_text_atomic(final: Path, text: str) -> None:
    with atomic_file(final) as tmp:
        tmp.write_text(text, encoding="utf-8")
