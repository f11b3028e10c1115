"""Where torch work runs: ``cpu``, ``cuda`` (``cuda:N``) or ``auto`` (CUDA when torch sees a device, else the CPU).

One check for every command and stage: a CUDA device that this machine's torch cannot see is refused before any
work, with what to do. torch is imported only when CUDA is asked for or ``auto`` has to look.
"""
from __future__ import annotations

import re
from typing import Any

from quantmill.errors import UserInputError

CHOICES = ("cpu", "cuda", "auto")
DEFAULT = "cpu"
_DEVICE_RE = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")


def check_device_name(name: str, flag: str = "--device") -> str:
    """``name`` if it names a device quantmill runs on (cpu, cuda, cuda:N, auto), else UserInputError."""
    if not _DEVICE_RE.match(name):
        raise UserInputError(f"{flag} {name}: not a device; use cpu, cuda, cuda:N or auto")
    return name


def resolve_device(name: str, flag: str = "--device") -> str:
    """The torch device string to run on: ``auto`` becomes cuda or cpu; cuda without a visible device is refused."""
    check_device_name(name, flag)
    if name == "cpu":
        return name
    import torch

    available = torch.cuda.is_available()
    if name == "auto":
        return "cuda" if available else "cpu"
    index = int(name.partition(":")[2] or 0)
    if not available or index >= torch.cuda.device_count():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise UserInputError(f"{flag} {name}: torch {torch.__version__} ({build}) sees "
                             f"{torch.cuda.device_count() if available else 'no'} CUDA device(s) here; "
                             "use --device cpu (or auto), or run on a machine with an NVIDIA GPU")
    return name


def resolve_devices(names: list[str] | tuple[str, ...], flag: str = "--devices") -> tuple[str, ...]:
    """Each of ``names`` resolved, duplicates (after ``auto`` is resolved) dropped, the order kept."""
    resolved: list[str] = []
    for name in names:
        device = resolve_device(name, flag)
        if device not in resolved:
            resolved.append(device)
    if not resolved:
        raise UserInputError(f"{flag}: name at least one device (cpu, cuda, auto)")
    return tuple(resolved)


def without_default_device(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a stage's parameters, the recipe's resources) without ``device`` where it is the CPU default: what was
    hashed and recorded before devices existed keeps its bytes (stage keys, the manifest's recipe)."""
    if data.get("device") == DEFAULT:
        del data["device"]
    return data
