"""Layer-level checkpoints of a layer-by-layer pass (statistics, GPTQ), so a killed pass resumes at its layer.

    checkpoint = LayerCheckpoint(directory, fingerprint)
    saved = checkpoint.load()            # None, or the state after the last finished layer
    ...                                   # after each decoder layer:
    checkpoint.save(next_layer, arrays, state)

``arrays`` (name -> tensor or numpy array) are written as ``.npy`` files, one per array and
layer, streamed from memory (no second copy); ``state`` is small JSON. A save writes the new
arrays under new names, then ``state.json`` by rename (the commit), then deletes the previous
layer's arrays: a kill at any point leaves either the old or the new checkpoint, whole. The
fingerprint (what the pass was asked to compute) guards against resuming someone else's
work: a checkpoint whose fingerprint differs is discarded. ``directory`` None disables
checkpoints. Arrays come back exactly (float32 stays float32), so a resumed pass writes the
same bytes as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from quantmill.atomic import temporary_next_to
from quantmill.jsonio import read_json_object
from quantmill.quantize.spill import StreamFile

if TYPE_CHECKING:
    import torch

LOG = logging.getLogger("quantmill.resume")
STATE_FILE = "state.json"
STREAMS_DIR = "streams"  # spilled activation streams (quantmill.quantize.spill)
FORMAT = 1


@dataclass(frozen=True)
class SavedLayers:
    """What a checkpoint holds: the first layer still to do, its arrays and its state."""

    next_layer: int
    arrays: dict[str, np.ndarray]  # memory-mapped, read-only; copy what must change
    state: dict[str, Any]
    files: dict[str, Path]  # each array's .npy file (to copy a spilled stream back without reading it)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LayerCheckpoint:
    """The checkpoints of one pass under ``directory`` (None: none are kept)."""

    def __init__(self, directory: Path | None, fingerprint: dict[str, Any]) -> None:
        self.directory = None if directory is None else Path(directory)
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))
        if self.directory is not None:
            check_checkpoint_dir(self.directory)

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def load(self) -> SavedLayers | None:
        """The last committed checkpoint, or None (none, or one made for other inputs: then it is removed)."""
        if self.directory is None or not (self.directory / STATE_FILE).is_file():
            return None
        saved = read_json_object(self.directory / STATE_FILE, "delete the checkpoint directory to start over")
        if saved.get("format") != FORMAT or saved.get("fingerprint") != self.fingerprint:
            LOG.info("%s: checkpoint made for other inputs; starting from layer 0", self.directory)
            self.clear()
            return None
        files = {name: self.directory / file for name, file in saved["arrays"].items()}
        arrays = {name: np.load(path, mmap_mode="r") for name, path in files.items()}
        return SavedLayers(int(saved["next_layer"]), arrays, saved["state"], files)

    def save(self, next_layer: int, arrays: Mapping[str, torch.Tensor | np.ndarray | StreamFile], state: dict[str, Any]) -> None:
        """Commit the state after layer ``next_layer - 1``: arrays first, then state.json by rename.

        A spilled stream (:class:`~quantmill.quantize.spill.StreamFile`) is copied file to file, never read into memory.
        """
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        previous = self._files()
        files: dict[str, str] = {}
        for i, (name, value) in enumerate(sorted(arrays.items())):
            file = f"layer{next_layer:05d}-{i:04d}.npy"
            if isinstance(value, StreamFile):
                value.save_to(self.directory / file)
                with open(self.directory / file, "rb+") as handle:
                    os.fsync(handle.fileno())
            else:
                data = value if isinstance(value, np.ndarray) else value.detach().cpu().numpy()
                with open(self.directory / file, "wb") as handle:
                    np.save(handle, np.ascontiguousarray(data), allow_pickle=False)
                    handle.flush()
                    os.fsync(handle.fileno())
            files[name] = file
        record = {"format": FORMAT, "fingerprint": self.fingerprint, "next_layer": next_layer, "arrays": files,
                  "state": state}
        tmp = temporary_next_to(self.directory / STATE_FILE)
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(record, indent=1, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.directory / STATE_FILE)
        _fsync_dir(self.directory)
        for file in sorted(previous - set(files.values())):
            (self.directory / file).unlink(missing_ok=True)

    def _files(self) -> set[str]:
        assert self.directory is not None
        return {p.name for p in self.directory.glob("layer*.npy")}

    def path(self, name: str) -> Path:
        """A file of the pass's own kept next to the checkpoints (e.g. a spool of packed tensors)."""
        assert self.directory is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        return self.directory / name

    def clear(self) -> None:
        if self.directory is not None:
            remove_checkpoints(self.directory)


def _owned(path: Path) -> bool:
    """A file or directory a layer checkpoint writes (state.json and its temporaries, arrays, spools, spilled streams)."""
    name = path.name
    return (name == STATE_FILE or (name.startswith(f".{STATE_FILE}.") and name.endswith(".part"))
            or (name.startswith("layer") and name.endswith(".npy")) or name.startswith("spool-")
            or (name == STREAMS_DIR and path.is_dir()))


def check_checkpoint_dir(directory: Path) -> None:
    """A checkpoint directory is new, or holds only what checkpoints write: nothing of the user's is ever removed."""
    from quantmill.errors import OutputError

    if directory.exists() and not directory.is_dir():
        raise OutputError(f"--checkpoint-dir {directory}: is a file; name a new or empty directory")
    strangers = sorted(p.name for p in directory.iterdir() if not _owned(p)) if directory.is_dir() else []
    if strangers:
        raise OutputError(f"--checkpoint-dir {directory}: holds {strangers[0]!r}, which no checkpoint wrote; name a new or "
                          "empty directory (quantmill removes its checkpoints when the pass is done)")


def remove_checkpoints(directory: Path) -> None:
    """Remove what checkpoints wrote in ``directory``, then the directory when it is left empty."""
    if not directory.is_dir():
        return
    for path in sorted(directory.iterdir()):
        if _owned(path):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    with contextlib.suppress(OSError):
        directory.rmdir()


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A writable tensor holding a copy of a checkpointed array."""
    import torch

    return torch.from_numpy(np.array(array, copy=True))
