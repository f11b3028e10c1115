"""One redaction rule for anything printed or logged: credentials in URLs become ``***``.

    redact("push to https://user:TOKEN@host/repo.git failed")  ->  "push to https://***@host/repo.git failed"
"""
from __future__ import annotations

import logging
import re

_URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@'\"<>]+@")


def redact(text: str) -> str:
    """``text`` with the user:password (or token) part of every URL replaced by ``***``."""
    return _URL_CREDENTIALS.sub(r"\g<scheme>***@", str(text))


class RedactingFormatter(logging.Formatter):
    """A log formatter whose every line (traceback included) goes through :func:`redact`."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))
