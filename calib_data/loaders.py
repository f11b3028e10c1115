"""Calibration text sources: a user's file (by suffix), the bundled corpora, or a cached Hub dataset.

``load_calibration_text(spec)`` turns the ``--calib`` value into a ``CalibrationText``:

* ``bundled``                       the corpora shipped in ``calib_data/corpora/``
* ``PATH.txt`` / ``.jsonl`` / ``.parquet``   a user's file, read by the loader registered
  for its suffix (``.jsonl`` and ``.parquet`` take the text from ``text_field``)
* ``hub:OWNER/NAME[:SPLIT]``        a Hugging Face dataset already in the local cache
  (never downloaded here)

Every problem (missing, empty, binary, malformed, unknown suffix) is one ``UserInputError``
naming the file and the fix.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from quantmill.calib_data.bundled import BUNDLED_SPEC, calibration_files
from quantmill.errors import InputFileError, UnsupportedError, UserInputError

HUB_PREFIX = "hub:"
DEFAULT_TEXT_FIELD = "text"
BINARY_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class CalibrationText:
    """Documents to calibrate on, and the name that artifacts record for them."""

    name: str
    documents: tuple[str, ...]


Loader = Callable[[Path, str], list[str]]


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputFileError(path, f"cannot read file ({exc.strerror})", "check the path and its permissions") from exc
    if b"\x00" in raw[:BINARY_SNIFF_BYTES]:
        raise InputFileError(path, "is a binary file, not text", "pass a UTF-8 text, .jsonl or .parquet file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputFileError(
            path, f"is not UTF-8 text (bad byte at offset {exc.start})", "convert it to UTF-8 or pass another file"
        ) from exc
    if not text.strip():
        raise InputFileError(path, "is empty (no text in it)", "pass a file with calibration text in it")
    return text


def load_txt(path: Path, text_field: str) -> list[str]:
    """A plain UTF-8 text file: one document."""
    return [_read_text(path)]


def load_jsonl(path: Path, text_field: str) -> list[str]:
    """JSON Lines: one object per line, its ``text_field`` string is a document."""
    docs: list[str] = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputFileError(path, f"line {number} is not valid JSON ({exc.msg})", "fix that line") from exc
        if not isinstance(record, dict) or text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise InputFileError(
                path, f"line {number} has no field {text_field!r} (found {keys})", "choose the field with --text-field"
            )
        value = record[text_field]
        if not isinstance(value, str):
            raise InputFileError(path, f"line {number}: field {text_field!r} is not a string", "choose a text field with --text-field")
        if value.strip():
            docs.append(value)
    if not docs:
        raise InputFileError(path, f"has no non-empty {text_field!r} strings", "pass a file with calibration text in it")
    return docs


def load_parquet(path: Path, text_field: str) -> list[str]:
    """A Parquet table: each non-empty string of column ``text_field`` is a document (needs pyarrow)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise UnsupportedError(f"{path}: reading .parquet files needs pyarrow, which is not installed; run: pip install pyarrow") from exc
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise InputFileError(path, f"is not a readable Parquet file ({exc})", "pass a valid .parquet file") from exc
    if text_field not in table.column_names:
        raise InputFileError(
            path, f"has no column {text_field!r} (columns: {', '.join(table.column_names)})", "choose one with --text-field"
        )
    values = table.column(text_field).to_pylist()
    if any(v is not None and not isinstance(v, str) for v in values):
        raise InputFileError(path, f"column {text_field!r} does not hold strings", "choose a text column with --text-field")
    docs = [v for v in values if v and v.strip()]
    if not docs:
        raise InputFileError(path, f"column {text_field!r} has no non-empty strings", "pass a file with calibration text in it")
    return docs


# suffix -> loader; the one table that decides how a user's file is read.
LOADERS: dict[str, Loader] = {
    ".txt": load_txt,
    ".jsonl": load_jsonl,
    ".parquet": load_parquet,
}


def load_file(path: Path, text_field: str = DEFAULT_TEXT_FIELD) -> list[str]:
    """Documents of one user file, read by the loader registered for its suffix."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(path, "no such file", "check the --calib path, or use --calib bundled")
    if path.is_dir():
        raise InputFileError(path, "is a directory, not a file", f"pass one {'/'.join(sorted(LOADERS))} file")
    loader = LOADERS.get(path.suffix.lower())
    if loader is None:
        raise UnsupportedError(f"{path}: unsupported calibration file type {path.suffix!r}; use one of {', '.join(sorted(LOADERS))}")
    return loader(path, text_field)


def _load_bundled() -> CalibrationText:
    files = calibration_files()
    if not files:
        raise InputFileError("calib_data/corpora", "no bundled calibration texts found", "reinstall quantmill")
    return CalibrationText(BUNDLED_SPEC, tuple(_read_text(f) for f in files))


def _load_hub(spec: str, text_field: str) -> CalibrationText:
    """A Hub dataset from the local cache only (``hub:owner/name[:split]``); never downloads."""
    repo_id, _, split = spec[len(HUB_PREFIX) :].partition(":")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UserInputError(f"--calib {spec}: expected hub:OWNER/NAME or hub:OWNER/NAME:SPLIT")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as exc:
        raise UnsupportedError(f"--calib {spec}: reading cached Hub datasets needs huggingface_hub; run: pip install huggingface_hub") from exc
    try:
        root = Path(snapshot_download(repo_id, repo_type="dataset", local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise UserInputError(
            f"--calib {spec}: dataset {repo_id!r} is not in the local Hugging Face cache (quantmill never downloads it);"
            " fetch it on a networked machine with `huggingface-cli download --repo-type dataset "
            f"{repo_id}` and copy the cache, or pass a local file"
        ) from exc
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in LOADERS)
    if split:
        files = [p for p in files if split in p.relative_to(root).as_posix()]
    if not files:
        wanted = f" for split {split!r}" if split else ""
        raise InputFileError(root, f"cached dataset has no {'/'.join(sorted(LOADERS))} files{wanted}", "pick another split or dataset")
    docs: list[str] = []
    for path in files:
        docs.extend(load_file(path, text_field))
    return CalibrationText(spec, tuple(docs))


def load_calibration_text(spec: str | Path, text_field: str = DEFAULT_TEXT_FIELD) -> CalibrationText:
    """Resolve ``--calib``: ``bundled``, ``hub:OWNER/NAME[:SPLIT]`` or a file path."""
    spec_str = str(spec)
    if spec_str == BUNDLED_SPEC:
        return _load_bundled()
    if spec_str.startswith(HUB_PREFIX):
        return _load_hub(spec_str, text_field)
    path = Path(spec_str)
    return CalibrationText(str(path), tuple(load_file(path, text_field)))
