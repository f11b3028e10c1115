"""The corpora shipped inside the package: calibration texts and one evaluation text.

Sources and licences are listed in ``calib_data/SOURCES.md``; ``scripts/make_corpora.py``
rebuilds the files. The evaluation text shares no 64-character window with any
calibration text (checked by the tests).
"""
from __future__ import annotations

from pathlib import Path

CORPORA_DIR = Path(__file__).resolve().parent / "corpora"
CALIBRATION_GLOB = "calib_*.txt"
EVAL_FILE = "eval_text.txt"
BUNDLED_SPEC = "bundled"


def calibration_files() -> list[Path]:
    """The bundled calibration texts, in sorted (deterministic) order."""
    return sorted(CORPORA_DIR.glob(CALIBRATION_GLOB))


def eval_file() -> Path:
    """The bundled evaluation text (never overlaps the calibration texts)."""
    return CORPORA_DIR / EVAL_FILE
