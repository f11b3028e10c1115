"""libllama and libggml as quantmill uses them: llama-cpp-python's ctypes binding, and their log.

``import llama_cpp`` runs the package's ``__init__``: the high-level ``Llama`` class with numpy, jinja2 and the
chat formats (about 0.15 s). :func:`binding` imports only ``llama_cpp.llama_cpp`` (about 0.03 s), which loads
libllama and declares its C API, under a placeholder package that leaves ``sys.modules`` once it is loaded; a
later ``import llama_cpp`` runs the real package, whose ``from .llama_cpp import *`` reuses that same module.
:func:`libllama_log` collects what libllama and ggml log during a block, instead of letting it reach stderr.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import logging
import sys
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

from quantmill.errors import ToolError

LOG = logging.getLogger("quantmill.libllama")
PACKAGE = "llama_cpp"
_lock = threading.Lock()


@functools.cache
def binding() -> Any:
    """llama-cpp-python's ``llama_cpp.llama_cpp`` module, without the rest of the package."""
    with _lock:
        if PACKAGE in sys.modules:  # the real package is loaded: its binding
            return _import_binding()
        spec = importlib.util.find_spec(PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ToolError("llama-cpp-python is not installed; install it with `pip install llama-cpp-python==0.3.36`")
        placeholder = types.ModuleType(PACKAGE)
        placeholder.__path__ = list(spec.submodule_search_locations)
        sys.modules[PACKAGE] = placeholder
        try:
            return _import_binding()
        finally:
            if sys.modules.get(PACKAGE) is placeholder:
                del sys.modules[PACKAGE]


def _import_binding() -> Any:
    import llama_cpp.llama_cpp as module

    return module


def c_function(name: str, restype: Any, *argtypes: Any) -> Any:
    """A libllama or libggml C function (found through libllama, which links libggml), declared."""
    function = getattr(binding()._lib, name)
    function.restype = restype
    function.argtypes = list(argtypes)
    return function


# --------------------------------------------------------------------------- log routing

# ggml_log_level → Python logging level (GGML_LOG_LEVEL_CONT continues the previous line).
_GGML_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_GGML_LEVEL_CONT = 5


class LibllamaLog:
    """Text libllama and ggml logged while a :func:`libllama_log` block was active.

    Lines are kept raw and sorted only when asked (libllama logs a line per tensor); ``on_line(text)`` is called
    for each as it comes (the quantizer's progress bar follows the per-tensor lines with it).
    """

    def __init__(self, on_line: Callable[[str], None] | None = None) -> None:
        self.on_line = on_line
        self.raw: list[tuple[int, bytes]] = []

    def add(self, ggml_level: int, text: bytes) -> None:
        self.raw.append((ggml_level, text))
        if self.on_line is not None:
            self.on_line(text.decode("utf-8", errors="replace"))

    @property
    def lines(self) -> list[tuple[int, str]]:
        """(Python logging level, text) per line; a GGML_LOG_LEVEL_CONT line takes the previous one's level."""
        out, level = [], logging.DEBUG
        for ggml_level, text in self.raw:
            level = level if ggml_level == _GGML_LEVEL_CONT else _GGML_LEVELS.get(ggml_level, logging.DEBUG)
            out.append((level, text.decode("utf-8", errors="replace")))
        return out

    warnings = property(lambda self: [text for level, text in self.lines if level == logging.WARNING])
    errors = property(lambda self: [text for level, text in self.lines if level >= logging.ERROR])

    def error_summary(self) -> str:
        lines = [ln.strip(" =\n") for ln in "".join(self.errors).splitlines()]
        return "; ".join(ln for ln in lines if ln) or "no message from libllama"

    def to_logger(self) -> None:
        """The block's lines to the ``quantmill.libllama`` logger, as debug detail (failures surface as exceptions)."""
        if LOG.isEnabledFor(logging.DEBUG):
            for _level, text in self.lines:
                if text.strip():
                    LOG.debug("%s", text.rstrip("\n"))


_active_log: list[LibllamaLog] = []


def _on_log(level: int, text: bytes | None, _user_data: ctypes.c_void_p) -> None:
    if _active_log:
        _active_log[-1].add(level, text or b"")
    elif text and text.strip():
        LOG.debug("%s", text.decode("utf-8", errors="replace").rstrip("\n"))


@functools.cache
def _log_callback() -> Any:
    """The ctypes callback (made once: it must outlive every libllama call), after ``llama_backend_init``."""
    lib = binding()
    callback = lib.llama_log_callback(_on_log)
    lib.llama_log_set(callback, ctypes.c_void_p(0))
    lib.llama_backend_init()
    return callback


@contextlib.contextmanager
def libllama_log(on_line: Callable[[str], None] | None = None) -> Iterator[LibllamaLog]:
    """Collect libllama's and ggml's log during the block; nothing of it reaches stderr.

    The callback is set again on every entry: ``import llama_cpp`` installs the package's own.
    """
    binding().llama_log_set(_log_callback(), ctypes.c_void_p(0))
    log = LibllamaLog(on_line=on_line)
    _active_log.append(log)
    try:
        yield log
    finally:
        _active_log.remove(log)
        log.to_logger()
