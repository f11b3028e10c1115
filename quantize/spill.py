"""Activation streams spilled to disk: memory-mapped ``.npy`` files that stay out of resident memory.

A layer-by-layer pass keeps samples x seqlen x hidden float32 per activation stream (8.6 GB per GPTQ
branch for 128 x 2048 tokens at hidden 8192). Under a memory budget the streams live in files:

    stream = StreamFile.create(path, shape)      # or StreamFile.copy_of(checkpointed_npy, path)
    stream.tensor[rows] ...                      # a torch view of the mapping, read and written in place
    stream.release(rows)                         # those rows' pages leave resident memory

The mapping is shared, so writes reach the file; ``release`` (``madvise(MADV_DONTNEED)``) only
unmaps pages from this process, the data stays in the page cache and the file. The values are
the same float32 bits as in memory, so a spilled pass writes the same bytes as one in memory.
"""
from __future__ import annotations

import mmap
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

PAGE = mmap.PAGESIZE


class StreamFile:
    """One float32 array in a memory-mapped ``.npy`` file, seen as a torch tensor."""

    def __init__(self, path: Path) -> None:
        import torch

        self.path = Path(path)
        with open(self.path, "rb") as handle:
            major, _ = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(handle)
            self.offset = handle.tell()
        if fortran or dtype != np.float32:
            raise ValueError(f"{self.path}: not a C-ordered float32 array")
        self._file = open(self.path, "r+b")
        self._map = mmap.mmap(self._file.fileno(), 0)
        array = np.frombuffer(self._map, dtype=np.float32, count=int(np.prod(shape)), offset=self.offset).reshape(shape)
        self.row_bytes = int(np.prod(shape[1:])) * 4
        self.tensor: torch.Tensor = torch.from_numpy(array)

    @classmethod
    def create(cls, path: Path, shape: tuple[int, ...]) -> StreamFile:
        """A new zero-filled stream file (sparse until written)."""
        header = {"descr": "<f4", "fortran_order": False, "shape": tuple(int(n) for n in shape)}
        with open(path, "wb") as handle:
            np.lib.format.write_array_header_1_0(handle, header)
            handle.truncate(handle.tell() + int(np.prod(shape)) * 4)
        return cls(path)

    @classmethod
    def copy_of(cls, source: Path, path: Path) -> StreamFile:
        """A working copy of a checkpointed ``.npy`` (copied by the kernel, never through this process's memory)."""
        shutil.copyfile(source, path)
        return cls(path)

    def release(self, rows: slice | None = None) -> None:
        """Drop the pages of ``rows`` (first-axis indices; None: all) from resident memory."""
        start = 0 if rows is None else self.offset + (rows.start or 0) * self.row_bytes
        stop = len(self._map) if rows is None else self.offset + rows.stop * self.row_bytes
        start -= start % PAGE
        stop = min(len(self._map), stop + (-stop) % PAGE)
        if stop > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def save_to(self, path: Path) -> None:
        """Write the stream to ``path`` as ``.npy`` (flushed first; a kernel copy)."""
        self._map.flush()
        shutil.copyfile(self.path, path)

    def close(self) -> None:
        del self.tensor
        try:
            self._map.close()
        except BufferError:  # a view of the mapping is still alive somewhere; the GC closes it with the view
            pass
        self._file.close()
