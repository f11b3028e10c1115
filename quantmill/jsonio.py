"""Reading JSON from a file, with the project's one-line error naming the file and the fix."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quantmill.errors import InputFileError


def read_json(path: Path, fix: str, missing_fix: str | None = None) -> Any:
    """The JSON value in ``path``; InputFileError (with ``fix``) when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "missing", missing_fix or fix)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFileError(path, f"cannot be read as JSON ({exc})", fix) from exc


def read_json_object(path: Path, fix: str, missing_fix: str | None = None) -> dict[str, Any]:
    """The JSON object in ``path``; InputFileError (with ``fix``) when it is missing, unreadable or not an object."""
    data = read_json(path, fix, missing_fix)
    if not isinstance(data, dict):
        raise InputFileError(path, "is not a JSON object", fix)
    return data
