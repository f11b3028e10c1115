"""GGUF quantization through libllama's ``llama_model_quantize`` (llama-cpp-python's ctypes).

The quantization itself is llama.cpp's: quantmill builds the parameter struct (file type,
per-tensor overrides, threads), checks the request up front so that mistakes are one-line
errors instead of libllama aborts, writes under a temporary name and renames, and then reads
the result back to report what each tensor really became. libllama checks each tensor's data as
it reads it (NaN, Inf, invalid blocks); that refusal comes back naming the tensor and the input.
Its log goes to the ``quantmill.libllama`` logger, not stderr (:func:`quantmill.llama_lib.libllama_log`).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from quantmill.atomic import atomic_file
from quantmill.errors import InputFileError, OutputError, ToolError, UnsupportedError, UserInputError
from quantmill.llama_lib import binding, libllama_log
from quantmill.outputs import check_output, gguf_signature
from quantmill.quantize.gguf.inspect import GGUFSummary, check_gguf_magic, summarize_gguf
from quantmill.quantize.gguf.types import ALIASES, FILE_TYPES, FLOAT_TYPES, GGMLType, GGUFFileType, lookup_file_type, parse_tensor_type

# Tensor types llama.cpp refuses to produce without an importance matrix.
IMATRIX_TENSOR_TYPES = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"})

# libllama's per-tensor fallback warning (src/llama-quant.cpp, tensor_type_fallback).
_FALLBACK_RE = re.compile(
    r"warning: (?P<name>\S+)\s+- ncols\s+(?P<ncols>\d+) not divisible by\s+(?P<block>\d+)"
    r" \(required for type\s+(?P<wanted>\S+)\)\s*(?:\(WARNING:[^)]*\)\s*)?-> falling back to\s+(?P<used>\S+)"
)
# libllama's per-tensor quantization line: "[  12/ 272] blk.1.attn_q.weight - ..."
_TENSOR_PROGRESS_RE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")
# libllama checks every input tensor as it reads it (ggml_validate_row_data: NaN/Inf, bad scales)
_INVALID_DATA_RE = re.compile(r"tensor '(?P<name>[^']+)' has invalid data")


# --------------------------------------------------------------------------- requests


class TensorOverride(NamedTuple):
    """``REGEX=TYPE``: tensors whose name matches REGEX (searched, as libllama does) get TYPE."""

    pattern: str
    tensor_type: GGMLType

    @classmethod
    def parse(cls, spec: str) -> TensorOverride:
        pattern, sep, type_name = spec.rpartition("=")
        if not sep or not pattern or not type_name:
            raise UserInputError(f"--override-tensor {spec!r}: expected REGEX=TYPE, e.g. 'ffn_down=Q6_K'")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UserInputError(f"--override-tensor {spec!r}: bad regular expression ({exc})") from exc
        return cls(pattern, parse_tensor_type(type_name))


class Fallback(NamedTuple):
    """A tensor libllama gave another type than the mix asked for, because of its row length."""

    tensor: str
    row_length: int
    wanted: str
    used: str


class QuantizeResult(NamedTuple):
    output: Path
    file_type: GGUFFileType
    summary: GGUFSummary
    fallbacks: tuple[Fallback, ...]
    seconds: float


_TYPE_SUFFIX_RE = re.compile(
    r"^(?P<stem>.+?)[-.](?P<type>" + "|".join(sorted({*FILE_TYPES, *ALIASES}, key=len, reverse=True)) + r")$", re.IGNORECASE
)


def output_stem(source: Path) -> str:
    """The model part of a GGUF's name: ``X-F16.gguf`` → ``X`` (a name with no type suffix is kept whole)."""
    source = Path(source)
    stem = source.stem if source.suffix.lower() == ".gguf" else source.name
    match = _TYPE_SUFFIX_RE.match(stem)
    return match.group("stem") if match else stem


def default_output_path(source: Path, file_type: GGUFFileType) -> Path:
    """llama.cpp naming: ``X-F16.gguf`` → ``X-Q4_K_M.gguf``; a name with no type gets ``-TYPE``."""
    return Path(source).with_name(f"{output_stem(source)}-{file_type.name}.gguf")


def parse_overrides(specs: Sequence[str]) -> tuple[TensorOverride, ...]:
    return tuple(TensorOverride.parse(spec) for spec in specs)


def check_tensor_sizes(summary: GGUFSummary) -> None:
    """Refuse an empty tensor (libllama divides by its size), naming the tensor."""
    for tensor in summary.tensors:
        if tensor.n_elements == 0:
            raise InputFileError(summary.path, f"tensor {tensor.name!r} is empty (shape {list(tensor.shape)})",
                                 "re-create the GGUF from a complete checkpoint")


def _import_arch_records() -> None:
    import quantmill.convert.arch  # noqa: F401  (loaded for GGUFSummary.require)


def _check_request(source: Path, output: Path, file_type: GGUFFileType, overrides: Sequence[TensorOverride],
                   allow_requantize: bool, imatrix: str | Path | None) -> GGUFSummary:
    """Refuse a request libllama would abort on or get wrong; return the source's summary (read once)."""
    if file_type.needs_imatrix and imatrix is None:
        raise UserInputError(f"--type {file_type.name}: this type needs an importance matrix; pass --imatrix FILE "
                             "(make one with `quantmill calibrate`) or choose a type that does not (e.g. Q4_K_M)")
    if output.resolve() == source.resolve():
        raise UserInputError(f"{output}: output would overwrite the input; pass --out with another name")
    inputs = [source, *([Path(imatrix)] if imatrix is not None else [])]
    check_output(output, kind="file", flag="--out", command="quantize gguf", inputs=inputs, owned=gguf_signature)
    if overrides and not file_type.is_quantized:
        raise UnsupportedError(f"--override-tensor: libllama ignores overrides for --type {file_type.name}; "
                               "use a quantized type or drop the overrides")
    for override in overrides:
        if override.tensor_type.name in IMATRIX_TENSOR_TYPES and imatrix is None:
            raise UnsupportedError(f"--override-tensor {override.pattern}={override.tensor_type.name}: this tensor type "
                                   "needs an importance matrix; choose another type")
    records = threading.Thread(target=_import_arch_records, daemon=True)
    records.start()  # imports while ggml reads the file (a C call, which releases the GIL): the two overlap
    summary = summarize_gguf(source)
    records.join()
    summary.require("gguf-quantize")
    names = [t.name for t in summary.tensors]
    for override in overrides:
        if not any(re.search(override.pattern, name) for name in names):
            raise UserInputError(f"--override-tensor {override.pattern!r}: matches no tensor in {source}; "
                                 f"tensor names look like {names[len(names) // 2]!r}")
    check_tensor_sizes(summary)
    requantized = sorted(t.name for t in summary.tensors if len(t.shape) >= 2 and t.type_name not in FLOAT_TYPES)
    if requantized and not allow_requantize:
        raise UserInputError(f"{source}: already quantized ({len(requantized)} tensors, e.g. {requantized[0]}); "
                             "start from an F32/F16/BF16 GGUF, or pass --allow-requantize (compounds the error)")
    return summary


def _build_params(file_type: GGUFFileType, overrides: Sequence[TensorOverride], threads: int | None,
                  allow_requantize: bool) -> tuple[Any, Any, list[bytes]]:
    """The ``llama_model_quantize_params`` struct, plus objects that must stay alive with it."""
    lib = binding()
    params = lib.llama_model_quantize_default_params()
    params.ftype = file_type.ftype_value
    params.nthread = threads if threads and threads > 0 else 0
    params.allow_requantize = allow_requantize
    keep_alive: list[bytes] = []
    table = None
    if overrides:
        # NULL-pattern-terminated array, as llama-quantize builds it for --tensor-type.
        table = (lib.llama_model_tensor_override * (len(overrides) + 1))()
        for i, override in enumerate(overrides):
            pattern = override.pattern.encode("utf-8")
            keep_alive.append(pattern)
            table[i].pattern = pattern
            table[i].type = override.tensor_type.value
        table[len(overrides)].pattern = None  # the terminator; its type is never read
        params.tt_overrides = ctypes.cast(table, ctypes.POINTER(lib.llama_model_tensor_override))
    return params, table, keep_alive


def _attach_imatrix(params: Any, imatrix_path: Path, summary: GGUFSummary, extra_keys: Sequence[tuple[str, int | str]]) -> list[Any]:
    """Point ``params`` at the imatrix means and its ``quantize.imatrix.*`` keys (and ``extra_keys``); return keepalives."""
    from quantmill.quantize.gguf.imatrix import imatrix_means, read_imatrix
    from quantmill.quantize.gguf.imatrix_data import check_imatrix_fits, imatrix_kv_overrides, imatrix_param_array, kv_override_array

    imatrix = read_imatrix(imatrix_path)
    rows = {t.name: int(t.shape[0]) for t in summary.tensors if len(t.shape) >= 2}
    means = imatrix_means(imatrix)
    check_imatrix_fits(means, rows, imatrix_path, summary.path)
    params.imatrix, keep = imatrix_param_array(means)
    params.kv_overrides, kv_keep = kv_override_array([*imatrix_kv_overrides(imatrix, imatrix_path.name), *extra_keys])
    return [*keep, *kv_keep]


def _parse_fallbacks(warnings: Sequence[str]) -> tuple[Fallback, ...]:
    found = {m["name"]: Fallback(tensor=m["name"], row_length=int(m["ncols"]), wanted=m["wanted"].upper(), used=m["used"].upper())
             for m in _FALLBACK_RE.finditer("".join(warnings))}
    return tuple(found[name] for name in sorted(found))


@contextlib.contextmanager
def _progress(desc: str, show: bool) -> Iterator[Callable[[str], None] | None]:
    """``on_line`` for :func:`libllama_log`: a per-tensor progress bar on stderr (tqdm is imported only to show one)."""
    if not show:
        yield None
        return
    from tqdm import tqdm

    with tqdm(desc=desc, unit="tensor", leave=False) as bar:

        def advance(line: str) -> None:
            if match := _TENSOR_PROGRESS_RE.match(line):
                bar.total = int(match.group(2))
                bar.update(int(match.group(1)) - bar.n)

        yield advance


# libllama writes through a C++ ofstream: a failed write surfaces as an iostream error, not an errno
IOSTREAM_ERRORS = ("basic_ios", "iostream error", "failed to write", "write error")
MIN_FREE_BYTES = 1 << 20


def _quantize_failure(source: Path, target: Path, type_name: str, summary: str) -> Exception:
    """libllama's failure as one line that blames the right file: the input for invalid tensor data, the
    output's disk for a failed write."""
    import shutil

    if invalid := _INVALID_DATA_RE.search(summary):
        return InputFileError(source, f"tensor {invalid['name']!r} holds NaN or infinite values (or invalid quantized blocks)",
                              "fix the weights and re-create the GGUF; quantmill never quantizes non-finite weights")
    if any(marker in summary.lower() for marker in IOSTREAM_ERRORS):
        try:
            free = shutil.disk_usage(target.resolve().parent).free
        except OSError:
            free = None
        room = f"only {free // 2**20} MiB free there; " if free is not None and free < MIN_FREE_BYTES * 64 else ""
        return OutputError(f"{target}: libllama could not write the {type_name} file ({summary}); {room}"
                           "free space on that disk or choose another --out")
    return ToolError(f"{source}: libllama could not quantize to {type_name}: {summary}")


def quantize_gguf(source: str | Path, file_type: str | GGUFFileType, output: str | Path | None = None, *,
                  overrides: Sequence[TensorOverride] = (), threads: int | None = None, allow_requantize: bool = False,
                  imatrix: str | Path | None = None, progress: bool = False,
                  extra_keys: Sequence[tuple[str, int | str]] = ()) -> QuantizeResult:
    """Quantize the GGUF ``source`` to ``file_type`` with libllama; return what was written.

    ``output`` defaults to :func:`default_output_path`. ``overrides`` give tensors matching a
    regex another tensor type (first match wins, as in ``llama-quantize --tensor-type``).
    ``threads`` ≤ 0 or None lets libllama use every hardware thread.

    ``imatrix`` is an importance-matrix GGUF (``quantmill calibrate`` or ``llama-imatrix``): its
    per-column means (Σx²/count) go to libllama, and its ``quantize.imatrix.*`` keys into the
    output, as ``llama-quantize --imatrix`` does.

    ``progress`` shows a per-tensor progress bar on stderr. ``extra_keys`` are metadata keys (int or
    str values) written into the output.
    """
    source = Path(source)
    check_gguf_magic(source)
    spec = file_type if isinstance(file_type, GGUFFileType) else lookup_file_type(file_type)
    target = Path(output) if output is not None else default_output_path(source, spec)
    summary = _check_request(source, target, spec, overrides, allow_requantize, imatrix)
    params, _table, _keep = _build_params(spec, overrides, threads, allow_requantize)
    if imatrix is not None:
        _keep.extend(_attach_imatrix(params, Path(imatrix), summary, extra_keys))
    elif extra_keys:
        from quantmill.quantize.gguf.imatrix_data import kv_override_array

        params.kv_overrides, kv_keep = kv_override_array(extra_keys)
        _keep.extend(kv_keep)
    started = time.perf_counter()
    with (
        _progress(f"quantize {spec.name}", progress) as on_tensor,
        atomic_file(target) as tmp,
        libllama_log(on_line=on_tensor) as log,
    ):
        status = binding().llama_model_quantize(os.fsencode(source), os.fsencode(tmp), ctypes.byref(params))
        if status != 0:
            raise _quantize_failure(source, target, spec.name, log.error_summary())
        fallbacks = _parse_fallbacks(log.warnings)
    seconds = time.perf_counter() - started
    return QuantizeResult(output=target, file_type=spec, summary=summarize_gguf(target), fallbacks=fallbacks, seconds=seconds)
