"""Progress of long work: a bar on a terminal, plain log lines everywhere else.

``bars`` (what the CLI passes as ``progress``: stderr is a terminal) shows a tqdm bar. Either
way, a line goes to the ``quantmill.progress`` logger at the first step, the last, and at most
every ``interval`` seconds between: the CLI shows those lines on stderr when it is not a
terminal (CI logs, ``nohup``, a Ray worker), and ``quantmill run`` keeps them in its log file.
"""
from __future__ import annotations

import logging
import time
from typing import Any

LOGGER_NAME = "quantmill.progress"
LOG = logging.getLogger(LOGGER_NAME)
LINE_INTERVAL_SECONDS = 30.0


def duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3725`` -> ``1h02m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class LayerProgress:
    """``total`` steps of ``desc`` (``start`` of them already done, e.g. by a resumed run)."""

    def __init__(self, desc: str, total: int, start: int = 0, *, bars: bool = False, unit: str = "layer",
                 interval: float = LINE_INTERVAL_SECONDS) -> None:
        self.desc, self.total, self.done, self.unit, self.interval = desc, total, start, unit, interval
        self._start_done = start
        self._started = self._last = time.monotonic()
        self._first = True
        self._bar: Any = None
        if bars:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, desc=desc, unit=unit, leave=False)

    def advance(self, note: str = "", n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(n)
        now = time.monotonic()
        if self._first or self.done >= self.total or now - self._last >= self.interval:
            self._first, self._last = False, now
            LOG.info("%s", self.line(note, now))

    def line(self, note: str, now: float) -> str:
        elapsed = now - self._started
        rate = elapsed / max(1, self.done - self._start_done)
        eta = "" if self.done >= self.total else f", ETA {duration(rate * (self.total - self.done))}"
        return f"{self.desc}: {self.unit} {self.done}/{self.total}{f' ({note})' if note else ''}, {duration(elapsed)} elapsed{eta}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
