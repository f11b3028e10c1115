"""Streaming tensor data into a GGUF file: row chunks, worker threads, zero-copy where possible.

A tensor whose bytes pass through unchanged (same type, no row permutation) is copied
file-to-file by the kernel (``copy_file_range``), never entering this process's
memory. Any other tensor is cut into row chunks; each chunk is permuted, widened to
float32 and cast or quantized (ggml's own C quantizers where
:mod:`quantmill.convert.ggml_quants` has them, else ``gguf.quants``) on a small thread pool
(both release the GIL), and the results are written strictly in order. Source pages are
dropped from memory as soon as their chunk is encoded, so the working set stays a
few chunks large whatever the model size.
"""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import IO

import gguf
import numpy as np

from quantmill.convert import ggml_quants
from quantmill.convert.safetensors_io import Checkpoint, TensorEntry
from quantmill.errors import InputFileError

Q = gguf.GGMLQuantizationType
CHUNK_ELEMENTS = 1 << 21  # ~8 MB of float32 per chunk
COPY_BLOCK = 1 << 30


@dataclass
class PlannedTensor:
    """One GGUF tensor: where it comes from and what it becomes."""

    name: str
    shape: tuple[int, ...]  # numpy order (rows first)
    qtype: Q
    nbytes: int
    entry: TensorEntry | None = None  # None: generated (``data`` is set)
    data: np.ndarray | None = None
    row_order: np.ndarray | None = None  # output row i = input row row_order[i]

    @property
    def passes_through(self) -> bool:
        """True when the output bytes are the stored bytes (so they can be copied as they are)."""
        if self.entry is None or self.row_order is not None:
            return False
        return (self.qtype, self.entry.dtype) in ((Q.F16, "F16"), (Q.F32, "F32"))


def check_finite(values: np.ndarray, entry: TensorEntry) -> None:
    """Refuse NaN/Inf in a chunk of ``entry`` (a float array in its stored or widened dtype)."""
    if not np.isfinite(values).all():
        raise InputFileError(entry.file, f"tensor {entry.name!r} holds NaN or infinite values",
                             "fix or re-export the checkpoint; quantmill never writes non-finite weights")


def encode_rows(rows: np.ndarray, dtype: str, qtype: Q, entry: TensorEntry | None = None) -> np.ndarray:
    """Stored rows (``dtype`` is the safetensors code) → GGUF bytes of ``qtype``, as llama.cpp computes them.

    With ``entry``, NaN/Inf in the rows is refused (naming the tensor) before anything is encoded.
    """
    if (qtype, dtype) in ((Q.F16, "F16"), (Q.F32, "F32")):
        if entry is not None:
            check_finite(rows, entry)
        return np.ascontiguousarray(rows)
    widened = ggml_quants.widen_rows(rows, dtype)
    if entry is not None:
        check_finite(widened, entry)
    return ggml_quants.quantize(widened, qtype)


@dataclass
class _Piece:
    """A slice of output: an encoding job, or a byte range to copy from a source file."""

    encode: Callable[[], np.ndarray] | None = None
    copy_from: TensorEntry | None = None
    done: Callable[[], None] | None = None  # runs once the piece is written


def _pieces(ckpt: Checkpoint, t: PlannedTensor) -> Iterator[_Piece]:
    if t.data is not None:
        data = t.data
        yield _Piece(encode=lambda: ggml_quants.quantize(data, t.qtype))
        return
    entry = t.entry
    assert entry is not None
    if t.passes_through:
        yield _Piece(copy_from=entry)
        return
    src = ckpt.array(entry.name)
    order = t.row_order
    if src.ndim <= 1:
        yield _Piece(encode=lambda: encode_rows(src[order] if order is not None else src, entry.dtype, t.qtype, entry),
                     done=lambda: ckpt.release(entry.name))
        return
    flat = src.reshape(-1, src.shape[-1]) if order is None else src
    step = max(1, CHUNK_ELEMENTS // int(np.prod(flat.shape[1:])))
    n_rows = flat.shape[0]
    for start in range(0, n_rows, step):
        stop = min(start + step, n_rows)
        rows: Callable[[], np.ndarray] = partial(flat.__getitem__, slice(start, stop) if order is None else order[start:stop])
        release = partial(ckpt.release_rows, entry.name, start, stop) if order is None else (
            partial(ckpt.release, entry.name) if stop == n_rows else None)
        yield _Piece(encode=partial(_encode_later, rows, entry, t.qtype), done=release)


def _encode_later(rows: Callable[[], np.ndarray], entry: TensorEntry, qtype: Q) -> np.ndarray:
    return encode_rows(rows(), entry.dtype, qtype, entry)


def _check_stored(ckpt: Checkpoint, entry: TensorEntry) -> None:
    """NaN/Inf check of a tensor copied as it is stored, chunk by chunk through the memory map."""
    flat = ckpt.array(entry.name).reshape(-1)
    step = CHUNK_ELEMENTS
    for start in range(0, flat.size, step):
        check_finite(flat[start:start + step], entry)
    del flat
    ckpt.release(entry.name)


def _copy_range(ckpt: Checkpoint, entry: TensorEntry, fout: IO[bytes]) -> None:
    """Append ``entry``'s stored bytes to ``fout`` in the kernel, or through the memory map if it cannot."""
    _check_stored(ckpt, entry)
    fout.flush()
    src_fd, dst_fd = ckpt.fileno(entry.name), fout.fileno()
    done = 0
    try:
        while done < entry.nbytes:
            n = os.copy_file_range(src_fd, dst_fd, min(COPY_BLOCK, entry.nbytes - done), entry.offset + done)
            if n <= 0:
                break
            done += n
    except OSError:
        pass  # not supported between these files: fall through to the mapped copy
    fout.seek(0, os.SEEK_END)
    if done < entry.nbytes:
        view = ckpt.array(entry.name).reshape(-1).view(np.uint8)[done:]
        for start in range(0, view.size, COPY_BLOCK):
            fout.write(view[start:start + COPY_BLOCK].data)
        ckpt.release(entry.name)


def write_tensor_data(
    writer: gguf.GGUFWriter, ckpt: Checkpoint, plan: list[PlannedTensor], *, threads: int = 2, progress: bool = True
) -> None:
    """Write the data section of every file of ``writer`` (header, KV and tensor info already written)."""
    from tqdm import tqdm

    assert writer.fout is not None
    by_name = {t.name: t for t in plan}
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool, tqdm(
        total=sum(t.nbytes for t in plan), unit="B", unit_scale=True, desc="Writing GGUF", disable=not progress
    ) as bar:
        for fout, infos in zip(writer.fout, writer.tensors, strict=True):
            writer.write_padding(fout, fout.tell())
            for name, info in infos.items():
                t = by_name[name]
                start = fout.tell()
                for piece, data in _pipelined(_pieces(ckpt, t), pool, depth=max(2, threads + 1)):
                    if piece.copy_from is not None:
                        _copy_range(ckpt, piece.copy_from, fout)
                    else:
                        assert data is not None
                        fout.write(data.data.cast("B"))
                    if piece.done is not None:
                        piece.done()
                written = fout.tell() - start
                if written != info.nbytes:
                    raise RuntimeError(f"{name}: wrote {written} bytes where the tensor table says {info.nbytes}")
                bar.update(written)
                writer.write_padding(fout, written)


def _pipelined(pieces: Iterator[_Piece], pool: ThreadPoolExecutor, depth: int) -> Iterator[tuple[_Piece, np.ndarray | None]]:
    """Yield pieces in order with their encoded data, keeping up to ``depth`` encodings in flight."""
    pending: deque[tuple[_Piece, Future[np.ndarray] | None]] = deque()
    for piece in pieces:
        pending.append((piece, pool.submit(piece.encode) if piece.encode is not None else None))
        while len(pending) > depth:
            head, future = pending.popleft()
            yield head, future.result() if future is not None else None
    while pending:
        head, future = pending.popleft()
        yield head, future.result() if future is not None else None
