"""The one output rule every command and stage goes through, and the one rule for names that become paths.

An output path may be written when it is new, an empty directory, or an earlier output of the same
command (recognised by ``owned``: a marker file, a file signature). It is refused, as one
:class:`OutputError` line naming it, when it

* is a symbolic link (replacing it would delete the link, writing through it would write elsewhere),
* is one of the command's inputs, or a directory that holds one (a *new* file next to an input is fine),
* is the current directory or one above it,
* exists and quantmill did not create it (an unrelated directory or file).

Nothing but quantmill's own temporaries (``.NAME.*.part`` next to the output) is ever removed.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

from quantmill.errors import OutputError, UserInputError

Owned = Callable[[Path], bool]
Kind = Literal["file", "dir"]

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
NAME_RULE = "letters, digits, '.', '_' or '-', starting with a letter or digit, at most 100 characters"


def check_name(value: str, what: str) -> str:
    """A name that becomes one path component (release name, ``card.name``, branch, file stem), or raise.

    ``what`` names the field or flag (``card.name``, ``--branch``) in the message.
    """
    if not isinstance(value, str) or not NAME_RE.fullmatch(value) or value.endswith("."):
        raise UserInputError(f"{what} {value!r} is not a valid name; use {NAME_RULE}")
    return value


# --------------------------------------------------------------------------- ownership tests
def marker(name: str) -> Owned:
    """An earlier output is a directory holding the file ``name``."""
    return lambda path: (path / name).is_file()


def gguf_signature(path: Path) -> bool:
    """An earlier output is a GGUF file (quantmill writes GGUF; it never replaces another kind of file)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == b"GGUF"
    except OSError:
        return False


def json_with_keys(*keys: str) -> Owned:
    """An earlier output is a JSON object with every one of ``keys``."""
    def owned(path: Path) -> bool:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and all(k in data for k in keys)
    return owned


def safetensors_metadata(key: str, value: str, file: str = "model.safetensors") -> Owned:
    """An earlier output is a directory whose ``file`` has ``key: value`` in its safetensors ``__metadata__``."""
    def owned(path: Path) -> bool:
        from quantmill.convert.safetensors_io import read_header

        try:
            return read_header(path / file)[1].get(key) == value
        except UserInputError:  # not a (readable) safetensors file
            return False
    return owned


# --------------------------------------------------------------------------- the rule
def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def check_output(
    path: str | Path,
    *,
    kind: Kind,
    flag: str,
    command: str,
    inputs: Iterable[str | Path] = (),
    owned: Owned | None = None,
) -> Path:
    """Check that ``path`` may be written as ``command``'s output; return it absolute, or raise OutputError.

    ``flag`` is how the user named it (``--out``, ``output``, ``recipe.yaml: output``).
    """
    given = Path(path)
    label = f"{flag} {given}"
    final = Path(os.path.abspath(given))
    if os.path.islink(final):
        raise OutputError(f"{label}: is a symbolic link (to {os.readlink(final)}); give a real path or a new name")
    real = _real(final)
    cwd = _real(Path.cwd())
    if real == cwd or real in cwd.parents:
        raise OutputError(f"{label}: is the current directory or one above it; name a new "
                          f"{'directory' if kind == 'dir' else 'file'}")
    for item in inputs:
        source = _real(Path(item))
        if real == source:
            raise OutputError(f"{label}: is an input of {command}; choose a new output path")
        if real in source.parents:
            raise OutputError(f"{label}: holds the input {item}; choose a new output path")
    if os.path.lexists(final):
        if kind == "dir":
            if not final.is_dir():
                raise OutputError(f"{label}: is a file; give a directory path")
            if any(final.iterdir()) and not (owned is not None and owned(final)):
                raise OutputError(f"{label}: exists and is not an earlier {command} output; "
                                  "choose a new directory or remove it")
        else:
            if final.is_dir():
                raise OutputError(f"{label}: is a directory; give a file name")
            if not (owned is not None and owned(final)):
                raise OutputError(f"{label}: exists and is not an earlier {command} output; "
                                  "choose a new name or remove it")
    return final


def remove_own_temporaries(final: Path) -> list[Path]:
    """Remove the ``.NAME.*.part`` temporaries a killed run left next to ``final``; return what went."""
    final = Path(os.path.abspath(final))
    parent = final.parent
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    for tmp in sorted(parent.glob(f".{glob_escape(final.name)}.*.part")):
        if tmp.is_symlink():
            continue
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


# --------------------------------------------------------------------------- OS errors at the boundary
WRITE_ERRORS = {
    errno.ENOSPC: "the disk is full; free space or choose another location",
    errno.EFBIG: "the file is larger than this file system or a resource limit allows; raise the limit (ulimit -f) "
                 "or choose another location",
    errno.EDQUOT: "the disk quota is exhausted; free space or choose another location",
    errno.EACCES: "permission denied; choose a writable location",
    errno.EPERM: "permission denied; choose a writable location",
    errno.EROFS: "the file system is read-only; choose a writable location",
}


def write_error(exc: OSError, path: str | Path, action: str = "writing failed") -> OutputError | None:
    """An OutputError for an OSError met while writing ``path``, or None when it is not a write failure.

    The path named is the one the OS named (``exc.filename``) when it did, else ``path``.
    """
    fix = WRITE_ERRORS.get(exc.errno or 0)
    if fix is None:
        return None
    where = exc.filename if exc.filename else path
    return OutputError(f"{where}: {action}: {fix}")
