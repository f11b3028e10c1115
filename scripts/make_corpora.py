"""Rebuild the bundled corpora under ``calib_data/corpora/`` from their upstream packages.

A maintainer tool, not used at run time. It reads texts that Debian packages and a PyPI
sdist install (see ``SOURCES.md`` for the list and the licences), cleans them (LF line
ends, no trailing blanks, no distributor headers), writes one ``.txt`` per source, and
then removes from the evaluation text every paragraph that shares a 64-character window
or a non-trivial line with the calibration text, so the two never overlap. Rebuilding
from the same package versions gives byte-identical files.

    apt-get install -y bible-kjv dict-devil dict-jargon python3.11-doc
    pip download --no-binary :all: --no-deps brotli==1.2.1   # then unpack it
    .venv/bin/python scripts/make_corpora.py --brotli-sdist DIR
"""
from __future__ import annotations

import argparse
import gzip
import re
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

from quantmill.calib_data.bundled import CORPORA_DIR, EVAL_FILE
from quantmill.calib_data.overlap import shared_lines, shared_windows

PY_DOC_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
PY_LIB = Path("/usr/lib/python3.11")
DICTD = Path("/usr/share/dictd")

KJV_BOOKS: tuple[tuple[str, str, int], ...] = (
    # (bible(1) abbreviation, printed name, chapters)
    ("Ge", "Genesis", 50),
    ("Ru", "Ruth", 4),
    ("Lu", "Luke", 24),
)
PY_DOC_PAGES: tuple[str, ...] = (
    "tutorial/appetite", "tutorial/interpreter", "tutorial/introduction",
    "tutorial/controlflow", "tutorial/datastructures", "tutorial/modules",
    "tutorial/inputoutput", "tutorial/errors", "tutorial/classes", "tutorial/stdlib",
    "tutorial/stdlib2", "tutorial/venv", "tutorial/floatingpoint",
    "howto/sorting", "howto/functional", "howto/regex", "howto/logging",
)
PY_MODULES: tuple[str, ...] = (
    "bisect", "colorsys", "heapq", "textwrap", "shlex", "graphlib", "fractions",
    "statistics", "functools", "calendar", "dataclasses", "string",
)
DEVIL_MAX_CHARS = 260_000
JARGON_MAX_CHARS = 280_000
PARADISE_LOST_BOOKS = 4  # books I-IV


def _clean(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    out = "\n".join(lines)
    out = re.sub(r"\n{4,}", "\n\n\n", out)
    return out.strip("\n") + "\n"


def _cut_at_paragraph(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n\n", 0, max_chars)
    return text[: cut if cut > 0 else max_chars]


def _kjv() -> str:
    parts: list[str] = []
    for abbrev, name, chapters in KJV_BOOKS:
        raw = subprocess.run(
            ["bible", "-f", f"{abbrev}1:1-{abbrev}{chapters}:999"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True,
        ).stdout
        by_chapter: dict[int, list[str]] = {}
        for line in raw.splitlines():
            match = re.match(r"\S*?(\d+):\d+ (.*)", line)
            if match:
                by_chapter.setdefault(int(match.group(1)), []).append(match.group(2).strip())
        parts.append(f"THE BOOK OF {name.upper()}")
        for chapter in sorted(by_chapter):
            parts.append(f"{name} {chapter}\n\n" + " ".join(by_chapter[chapter]))
    return "\n\n".join(parts)


def _dictd(name: str, first_line: str) -> str:
    """A dictd database from its first real entry on (the dictd/distributor header dropped)."""
    text = gzip.decompress((DICTD / f"{name}.dict.dz").read_bytes()).decode("utf-8")
    start = re.search(rf"^{first_line}$", text, flags=re.M)
    if start is None:
        raise SystemExit(f"{name}.dict.dz: line {first_line!r} not found; has the package changed?")
    return text[start.start():]


def _devil() -> str:
    return _cut_at_paragraph(_dictd("devil", r"\s*PREFACE"), DEVIL_MAX_CHARS)


def _jargon() -> str:
    return _cut_at_paragraph(_dictd("jargon", r"\(TM\)"), JARGON_MAX_CHARS)


def _python_docs() -> str:
    pages = [(PY_DOC_SOURCES / f"{page}.rst.txt").read_text(encoding="utf-8") for page in PY_DOC_PAGES]
    return "\n\n".join(pages)


def _python_code() -> str:
    parts = []
    for module in PY_MODULES:
        source = (PY_LIB / f"{module}.py").read_text(encoding="utf-8")
        parts.append(f"# ---- {module}.py ----\n{source}")
    return "\n\n".join(parts)


def _brotli_text(sdist: Path, name: str) -> str:
    return (sdist / "tests" / "testdata" / name).read_text(encoding="ascii")


def _as_you_like_it(sdist: Path) -> str:
    return _brotli_text(sdist, "asyoulik.txt")


def _paradise_lost(sdist: Path) -> str:
    text = _clean(_brotli_text(sdist, "plrabn12.txt"))
    start = text.find("Paradise Lost\n")
    books = [m.start() for m in re.finditer(r"^Book [IVX]+$", text, flags=re.M)]
    end = books[PARADISE_LOST_BOOKS] if len(books) > PARADISE_LOST_BOOKS else len(text)
    return text[start:end]


def _alice(sdist: Path) -> str:
    return _brotli_text(sdist, "alice29.txt")


def _python_faq() -> str:
    return (PY_DOC_SOURCES / "faq/programming.rst.txt").read_text(encoding="utf-8")


CALIBRATION_BUILDERS: dict[str, Callable[[Path], str]] = {
    "calib_kjv_bible.txt": lambda sdist: _kjv(),
    "calib_as_you_like_it.txt": _as_you_like_it,
    "calib_paradise_lost.txt": _paradise_lost,
    "calib_devils_dictionary.txt": lambda sdist: _devil(),
    "calib_jargon_file.txt": lambda sdist: _jargon(),
    "calib_python_docs.txt": lambda sdist: _python_docs(),
    "calib_python_code.txt": lambda sdist: _python_code(),
}
EVAL_BUILDERS: tuple[Callable[[Path], str], ...] = (_alice, lambda sdist: _python_faq())


def _drop_overlapping_paragraphs(text: str, reference: Iterable[str]) -> tuple[str, int]:
    reference = list(reference)
    paragraphs = text.split("\n\n")
    bad = shared_windows(text, reference)
    lines = set(shared_lines(text, reference))
    kept, dropped, pos = [], 0, 0
    for para in paragraphs:
        span = range(pos, pos + len(para))
        pos += len(para) + 2
        if any(start in span or start + 63 in span for start in bad) or any(
            line.strip() in lines for line in para.splitlines()
        ):
            dropped += 1
            continue
        kept.append(para)
    return "\n\n".join(kept), dropped


def build(sdist: Path, out_dir: Path = CORPORA_DIR) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    calibration: list[str] = []
    for name, builder in sorted(CALIBRATION_BUILDERS.items()):
        text = _clean(builder(sdist))
        (out_dir / name).write_text(text, encoding="utf-8")
        calibration.append(text)
        print(f"{name}: {len(text):,} chars")
    eval_text = _clean("\n\n\n".join(_clean(b(sdist)) for b in EVAL_BUILDERS))
    for _ in range(3):  # dropping a paragraph can join two others into a new window; repeat
        eval_text, dropped = _drop_overlapping_paragraphs(eval_text, calibration)
        eval_text = _clean(eval_text)
        print(f"{EVAL_FILE}: dropped {dropped} paragraphs overlapping the calibration text")
        if dropped == 0:
            break
    (out_dir / EVAL_FILE).write_text(eval_text, encoding="utf-8")
    print(f"{EVAL_FILE}: {len(eval_text):,} chars")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--brotli-sdist", type=Path, required=True, help="unpacked brotli-1.2.1 sdist")
    parser.add_argument("--out", type=Path, default=CORPORA_DIR)
    args = parser.parse_args()
    build(args.brotli_sdist, args.out)


if __name__ == "__main__":
    main()
