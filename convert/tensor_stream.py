"""Streaming tensor data into a GGUF file: row chunks, worker threads, zero-copy where possible.

A tensor whose bytes pass through unchanged (same type, no row permutation) is copied
file-to-file by the kernel (``copy_file_range``), never entering this process's
memory. Any other tensor is cut into row chunks; each chunk is permuted, widened and cast
or quantized by :func:`quantmill.convert.ggml_quants.encode` (ggml's own C routines where it
has them, else ``gguf.quants``; both release the GIL) on a small thread pool, into the
worker's own output buffer, reused chunk after chunk (fresh pages cost a fault and a zeroing
each). Every piece's place in the file is known from the tensor table, so the worker that
encoded it also writes it there (``pwrite``), one worker at a time: two threads writing one
file at once contend for its inode lock, and the kernel spins on it (measured). Source pages
are dropped from memory as soon as their chunk is written, so the working set stays a few
chunks large whatever the model size.
"""
from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import gguf
import numpy as np

from quantmill.convert import ggml_quants
from quantmill.convert.safetensors_io import Checkpoint, TensorEntry
from quantmill.errors import InputFileError

Q = gguf.GGMLQuantizationType
CHUNK_ELEMENTS = 1 << 21  # ~8 MB of float32 per chunk
COPY_BLOCK = 1 << 30
_local = threading.local()  # each worker thread's output buffer


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
    if values.dtype == np.float16:  # numpy's float16 isfinite is ~10x slower than testing the exponent bits
        finite = not (np.bitwise_and(values.view(np.uint16), 0x7C00) == 0x7C00).any()
    else:
        finite = bool(np.isfinite(values).all())
    if not finite:
        raise InputFileError(entry.file, f"tensor {entry.name!r} holds NaN or infinite values",
                             "fix or re-export the checkpoint; quantmill never writes non-finite weights")


def encode_rows(rows: np.ndarray, dtype: str, qtype: Q, entry: TensorEntry | None = None,
                out: np.ndarray | None = None) -> np.ndarray:
    """Stored rows (``dtype`` is the safetensors code) → GGUF bytes of ``qtype``, as llama.cpp computes them.

    With ``entry``, NaN/Inf in the rows is refused (naming the tensor) before it is encoded.
    ``out`` (uint8) may receive the bytes, as in :func:`ggml_quants.encode`.
    """
    check = partial(check_finite, entry=entry) if entry is not None else None
    if (qtype, dtype) in ((Q.F16, "F16"), (Q.F32, "F32")):
        if check is not None:
            check(rows)
        return np.ascontiguousarray(rows)
    return ggml_quants.encode(rows, dtype, qtype, check, out)


@dataclass
class _Piece:
    """``nbytes`` of output, which ``write(fd, offset)`` puts at ``offset`` of the open file ``fd``."""

    nbytes: int
    write: Callable[[int, int], None]
    done: Callable[[], None] | None = None  # runs once the piece is written


def _pieces(ckpt: Checkpoint, t: PlannedTensor, lock: threading.Lock) -> Iterator[_Piece]:
    def encoded(nbytes: int, encode: Callable[[np.ndarray], np.ndarray], done: Callable[[], None] | None = None) -> _Piece:
        return _Piece(nbytes, partial(_write_encoded, encode, nbytes, t.name, lock), done)

    if t.data is not None:
        data = t.data
        yield encoded(t.nbytes, lambda out: ggml_quants.quantize(data, t.qtype))
        return
    entry = t.entry
    assert entry is not None
    if t.passes_through:
        yield _Piece(t.nbytes, partial(_copy_range, ckpt, entry, lock))
        return
    src = ckpt.array(entry.name)
    order = t.row_order
    if src.ndim <= 1:
        yield encoded(t.nbytes, lambda out: encode_rows(src[order] if order is not None else src, entry.dtype, t.qtype, entry, out),
                      done=lambda: ckpt.release(entry.name))
        return
    flat = src.reshape(-1, src.shape[-1]) if order is None else src
    step = max(1, CHUNK_ELEMENTS // int(np.prod(flat.shape[1:])))
    n_rows = flat.shape[0]
    row_bytes = t.nbytes // max(1, n_rows)
    for start in range(0, n_rows, step):
        stop = min(start + step, n_rows)
        rows: Callable[[], np.ndarray] = partial(flat.__getitem__, slice(start, stop) if order is None else order[start:stop])
        release = partial(ckpt.release_rows, entry.name, start, stop) if order is None else (
            partial(ckpt.release, entry.name) if stop == n_rows else None)
        yield encoded((stop - start) * row_bytes, partial(_encode_later, rows, entry, t.qtype), release)


def _encode_later(rows: Callable[[], np.ndarray], entry: TensorEntry, qtype: Q, out: np.ndarray) -> np.ndarray:
    return encode_rows(rows(), entry.dtype, qtype, entry, out)


def _output_buffer(nbytes: int) -> np.ndarray:
    """This worker thread's output buffer, at least ``nbytes`` long."""
    buf: np.ndarray | None = getattr(_local, "out", None)
    if buf is None or buf.size < nbytes:
        buf = _local.out = np.empty(nbytes, np.uint8)
    return buf


def _write_encoded(encode: Callable[[np.ndarray], np.ndarray], nbytes: int, name: str, lock: threading.Lock,
                   fd: int, offset: int) -> None:
    data = encode(_output_buffer(nbytes))
    if data.nbytes != nbytes:
        raise RuntimeError(f"{name}: encoded {data.nbytes} bytes where the tensor table expects {nbytes}")
    with lock:
        _pwrite_all(fd, data, offset)


def _pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    view = np.ascontiguousarray(data).data.cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _check_stored(ckpt: Checkpoint, entry: TensorEntry) -> None:
    """NaN/Inf check of a tensor copied as it is stored, chunk by chunk through the memory map
    (each chunk's pages dropped once checked: two workers may be checking two large tensors)."""
    src = ckpt.array(entry.name)
    if src.size == 0:
        return
    rows = src.reshape(-1, src.shape[-1]) if src.ndim > 1 else src.reshape(1, -1)
    step = max(1, CHUNK_ELEMENTS // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        check_finite(rows[start:start + step], entry)
        ckpt.release_rows(entry.name, start, start + step)


def _copy_range(ckpt: Checkpoint, entry: TensorEntry, lock: threading.Lock, fd: int, offset: int) -> None:
    """Put ``entry``'s stored bytes at ``offset`` of ``fd``, in the kernel, or through the memory map if it cannot."""
    _check_stored(ckpt, entry)
    src_fd = ckpt.fileno(entry.name)
    done = 0
    with lock:
        try:
            while done < entry.nbytes:
                n = os.copy_file_range(src_fd, fd, min(COPY_BLOCK, entry.nbytes - done), entry.offset + done, offset + done)
                if n <= 0:
                    break
                done += n
        except OSError:
            pass  # not supported between these files: fall through to the mapped copy
        if done < entry.nbytes:
            view = ckpt.array(entry.name).reshape(-1).view(np.uint8)[done:]
            for start in range(0, view.size, COPY_BLOCK):
                _pwrite_all(fd, view[start:start + COPY_BLOCK], offset + done + start)
            ckpt.release(entry.name)


def write_tensor_data(
    writer: gguf.GGUFWriter, ckpt: Checkpoint, plan: list[PlannedTensor], *, threads: int = 2, progress: bool = True
) -> None:
    """Write the data section of every file of ``writer`` (header, KV and tensor info already written)."""
    from tqdm import tqdm

    assert writer.fout is not None
    by_name = {t.name: t for t in plan}
    lock = threading.Lock()
    align = writer.data_alignment
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool, tqdm(
        total=sum(gguf.GGUFWriter.ggml_pad(t.nbytes, align) for t in plan), unit="B", unit_scale=True, desc="Writing GGUF",
        disable=not progress
    ) as bar:
        for fout, infos in zip(writer.fout, writer.tensors, strict=True):
            writer.write_padding(fout, fout.tell())
            fout.flush()
            tensors = [(by_name[name], info.nbytes) for name, info in infos.items()]
            for piece in _pipelined(_placed(ckpt, tensors, lock, fout.tell(), align), pool, fout.fileno(), depth=threads + 1):
                bar.update(piece.nbytes)
                if piece.done is not None:
                    piece.done()
            fout.seek(0, os.SEEK_END)


def _placed(ckpt: Checkpoint, tensors: list[tuple[PlannedTensor, int]], lock: threading.Lock, offset: int,
            alignment: int) -> Iterator[tuple[_Piece, int]]:
    """Every piece of one file's tensors, with its offset in the file; after each tensor, its zero padding."""
    for t, nbytes in tensors:
        start = offset
        for piece in _pieces(ckpt, t, lock):
            yield piece, offset
            offset += piece.nbytes
        if offset - start != nbytes:
            raise RuntimeError(f"{t.name}: {offset - start} bytes planned where the tensor table says {nbytes}")
        pad = gguf.GGUFWriter.ggml_pad(nbytes, alignment) - nbytes
        if pad:
            yield _Piece(pad, partial(_write_zeros, pad, lock)), offset
            offset += pad


def _write_zeros(n: int, lock: threading.Lock, fd: int, offset: int) -> None:
    with lock:
        _pwrite_all(fd, np.zeros(n, np.uint8), offset)


def _pipelined(placed: Iterator[tuple[_Piece, int]], pool: ThreadPoolExecutor, fd: int, depth: int) -> Iterator[_Piece]:
    """Write the pieces on ``pool``, up to ``depth`` at a time; yield each, in order, once it is written."""
    pending: deque[tuple[_Piece, Future[None]]] = deque()
    for piece, offset in placed:
        pending.append((piece, pool.submit(piece.write, fd, offset)))
        while len(pending) > depth:
            head, future = pending.popleft()
            future.result()
            yield head
    while pending:
        head, future = pending.popleft()
        future.result()
        yield head
