"""Exception hierarchy. The library raises these; only the CLI prints them.

Every message names the file or field at fault and what to do about it, on one line.
"""
from __future__ import annotations

from pathlib import Path


class QuantmillError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class UserInputError(QuantmillError):
    """Bad input from the user: a file, a directory, a flag or a recipe field."""

    exit_code = 2


class InputFileError(UserInputError):
    """A file or directory that is missing, unreadable or malformed."""

    def __init__(self, path: str | Path, problem: str, fix: str) -> None:
        super().__init__(f"{path}: {problem}; {fix}")
        self.path = Path(path)


class UnsupportedError(UserInputError):
    """Input that is well formed but asks for something quantmill does not do."""


class OutputError(UserInputError):
    """An output location that cannot be written."""


class ToolError(QuantmillError):
    """An external library (libllama, torch) failed on input we believed valid."""


class VerificationFailed(QuantmillError):
    """An artifact broke its parity thresholds (the report has been written). Exit code 1."""

    exit_code = 1
