"""Sizes for people: one rendering of a byte count everywhere (decimal units, as the disk and the Hub count)."""
from __future__ import annotations


def human_bytes(n: float | None) -> str:
    """``1234567`` -> ``1.2 MB``; None -> ``unknown``."""
    if n is None:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)
