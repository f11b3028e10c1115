"""Overlap checks between two texts: shared fixed-width character windows and shared lines.

Used to prove that the bundled evaluation text never repeats the calibration text.
"""
from __future__ import annotations

from collections.abc import Iterable

WINDOW = 64
TRIVIAL_LINE_CHARS = 24


def shared_windows(text: str, references: Iterable[str], window: int = WINDOW) -> list[int]:
    """Sorted start offsets in ``text`` of every ``window``-char substring found in a reference."""
    starts: dict[str, list[int]] = {}
    for i in range(len(text) - window + 1):
        starts.setdefault(text[i : i + window], []).append(i)
    found: set[int] = set()
    for ref in references:
        for j in range(len(ref) - window + 1):
            hit = starts.get(ref[j : j + window])
            if hit is not None:
                found.update(hit)
    return sorted(found)


def is_trivial_line(line: str, min_chars: int = TRIVIAL_LINE_CHARS) -> bool:
    """Short lines and lines without letters (rules, separators) are trivial."""
    stripped = line.strip()
    return len(stripped) < min_chars or not any(ch.isalpha() for ch in stripped)


def shared_lines(text: str, references: Iterable[str], min_chars: int = TRIVIAL_LINE_CHARS) -> list[str]:
    """Sorted non-trivial lines (stripped) present both in ``text`` and in a reference."""
    ours = {line.strip() for line in text.splitlines() if not is_trivial_line(line, min_chars)}
    theirs: set[str] = set()
    for ref in references:
        theirs.update(line.strip() for line in ref.splitlines())
    return sorted(ours & theirs)
