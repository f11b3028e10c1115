"""GGUF mixes chosen for a size budget: per tensor, the ggml type that loses least for the bytes.

    plan = plan_mix(source, imatrix, MixTarget(bpw=5.0))     # measure, then choose
    result = write_mix(plan, out)                             # libllama, one override per tensor

1. **Costs.** Every weight tensor libllama quantizes is quantized at every candidate type its rows
   fit (whole blocks, so libllama never falls back) by libggml's own quantizer with the
   importance matrix, and read back (:mod:`quantmill.quantize.gguf.tensor_error`): its error is
   Σ_ij a_j (w_ij − q_ij)², ``a`` the imatrix means of its input columns. Bytes per type are exact.
2. **Gains** (optional, :mod:`quantmill.quantize.gguf.sensitivity`): one tensor at a time is
   replaced by its quantized value at a probe type in the torch model and the mean KL divergence
   to the float model on a short calibration text is measured; the tensor's gain is that KLD over
   its error at the probe type, so ``gain × error`` predicts the tensor's share of the mix's KLD.
   Without gains every tensor has gain 1 and the objective is the summed error.
3. **Choice.** A multiple-choice knapsack: minimise Σ gain_t · error_t(type_t) under Σ bytes ≤ the
   budget. Per tensor only the lower convex hull of its (bytes, error) points is kept; starting from
   every tensor's cheapest type, the upgrade with the best error saved per byte is taken while it
   fits (ties by tensor name): the optimum of the relaxed problem up to the last upgrade, and the
   same types for the same inputs.
4. **Writing.** libllama's ``llama_model_quantize`` with the file type of the most common chosen
   type (what llama.cpp itself reports for a file of mixed types) and one anchored override per
   tensor; the file's ``quantmill.mix.*`` keys record the mix's name, target and method.
"""
from __future__ import annotations

import heapq
import logging
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantmill.errors import InputFileError, UserInputError

if TYPE_CHECKING:
    import numpy as np

    from quantmill.quantize.gguf.libllama import QuantizeResult
    from quantmill.quantize.gguf.types import GGMLType

LOG = logging.getLogger("quantmill.gguf.mix")

# candidate tensor types, smallest first; a tensor gets those its rows fit. All run in llama.cpp's CPU and CUDA backends.
CANDIDATE_TYPES = ("Q2_K", "Q3_K", "IQ3_S", "IQ4_XS", "Q4_0", "IQ4_NL", "Q4_K", "Q4_1", "Q5_0", "Q5_K", "Q5_1",
                   "Q6_K", "Q8_0")
DEFAULT_MAX_ROWS = 256  # rows measured per tensor (evenly spaced); the error is scaled to all rows
GGUF_ALIGNMENT = 32  # general.alignment's default: every tensor's data starts on it
HEADER_MARGIN = 16 * 1024  # metadata the output adds (file type, imatrix and mix keys), with room to spare
KEY_PREFIX = "quantmill.mix."  # the mix's metadata keys in the file: name, target, method, predicted
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class MixTarget:
    """The budget: file bytes (``size``) or bits per weight of the tensor data (``bpw``, as llama.cpp counts it)."""

    size: int | None = None
    bpw: float | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if (self.size is None) == (self.bpw is None):
            raise UserInputError("a mix needs exactly one budget: --target-size SIZE or --target-bpw BPW")
        if self.bpw is not None:
            from quantmill.quantize.gguf.types import ggml_type

            smallest = min(ggml_type(name).bpw for name in CANDIDATE_TYPES)
            if not smallest < self.bpw <= 16.0:
                raise UserInputError(f"--target-bpw {self.bpw}: must be above {smallest:g} (the smallest candidate type, "
                                     "plus the unquantized norms) and at most 16 bits per weight, e.g. 5.0")
        if self.size is not None and self.size <= 0:
            raise UserInputError(f"--target-size {self.size}: must be a positive size, e.g. 95MiB")
        if self.name is not None and not _NAME.fullmatch(self.name):
            raise UserInputError(f"mix name {self.name!r}: use letters, digits, '.', '_' or '-' (e.g. QM-5.0)")

    @property
    def label(self) -> str:
        """The mix's name: given, or ``QM-<bpw>`` / ``QM-<MiB>MiB``."""
        if self.name:
            return self.name
        if self.bpw is not None:
            return f"QM-{self.bpw:g}"
        assert self.size is not None
        return f"QM-{self.size / 2**20:.0f}MiB"

    def describe(self) -> str:
        return f"{self.bpw:g} bpw" if self.bpw is not None else f"{self.size} bytes"


@dataclass(frozen=True)
class Option:
    """One candidate type of one tensor: its stored bytes and its measured error."""

    type_name: str
    n_bytes: int
    error: float


@dataclass
class TensorCost:
    """One quantized tensor's options (sorted by bytes) and its gain (KLD per unit of error)."""

    name: str
    shape: tuple[int, ...]  # ggml order: row length first
    options: list[Option]
    gain: float = 1.0

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def option(self, type_name: str) -> Option:
        return next(o for o in self.options if o.type_name == type_name)


@dataclass
class MixPlan:
    """The chosen type per tensor, what it is predicted to cost, and how it was chosen."""

    source: Path
    imatrix: Path
    target: MixTarget
    costs: list[TensorCost]
    types: dict[str, str]  # tensor name -> type, sorted by name
    budget_bytes: int  # tensor data the chosen tensors may use (padded, for a size target)
    fixed_bytes: int  # tensor data that is not chosen (norms, unquantized tensors)
    fixed_padded: int  # the same, each tensor padded to the alignment
    header_bytes: int  # metadata and tensor infos, with HEADER_MARGIN
    n_elements: int
    refined: bool
    seconds: float
    method: dict[str, Any] = field(default_factory=dict)

    @property
    def tensor_bytes(self) -> int:
        return self.fixed_bytes + sum(c.option(self.types[c.name]).n_bytes for c in self.costs)

    @property
    def predicted_size(self) -> int:
        return self.header_bytes + sum(_padded(c.option(self.types[c.name]).n_bytes) for c in self.costs) + self.fixed_padded

    @property
    def bpw(self) -> float:
        return 8.0 * self.tensor_bytes / self.n_elements

    @property
    def predicted(self) -> float:
        """Σ gain · error: the predicted mean KLD when refined, else the summed imatrix-weighted error."""
        return sum(c.gain * c.option(self.types[c.name]).error for c in self.costs)

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for type_name in self.types.values():
            counts[type_name] = counts.get(type_name, 0) + 1
        return dict(sorted(counts.items()))

    def record(self) -> dict[str, Any]:
        """What the manifest says about the mix (no timings: the same inputs give the same bytes)."""
        return {"name": self.target.label, "target": self.target.describe(), "bpw": round(self.bpw, 4),
                "predicted_size": self.predicted_size, "refined": self.refined,
                ("predicted_kld" if self.refined else "predicted_error"): self.predicted,
                "method": self.method, "types": self.types,
                **({"gains": {c.name: c.gain for c in sorted(self.costs, key=lambda c: c.name)}} if self.refined else {})}


def _padded(n: int) -> int:
    return -(-n // GGUF_ALIGNMENT) * GGUF_ALIGNMENT


# parts of names whose tensors libllama's quantizer copies as they are (llama-quant.cpp, tensor_allows_quantization)
_NOT_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
                  "per_layer_model_proj", "position_embd.weight", "token_types.weight", "ssm_conv1d",
                  "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight")


def quantized_by_libllama(name: str, n_dims: int) -> bool:
    """Whether libllama's quantizer converts this tensor: 2-D or 3-D, named ``*weight``, not a norm (and so on)."""
    return n_dims >= 2 and name.endswith("weight") and not any(part in name for part in _NOT_QUANTIZED)


def candidate_types(n_per_row: int, names: Sequence[str] = CANDIDATE_TYPES) -> list[GGMLType]:
    """The candidate types whose blocks rows of ``n_per_row`` weights fill exactly."""
    from quantmill.quantize.gguf.tensor_error import fits
    from quantmill.quantize.gguf.types import ggml_type

    return [t for t in (ggml_type(n) for n in names) if fits(t, n_per_row)]


def measure_costs(source: Path, means: dict[str, np.ndarray], *, max_rows: int | None = DEFAULT_MAX_ROWS,
                  types: Sequence[str] = CANDIDATE_TYPES, threads: int = 1) -> tuple[list[TensorCost], Fixed]:
    """Every quantized tensor's options, and what the mix does not choose (one read of the file)."""
    import numpy as np
    from gguf import GGUFReader

    from quantmill.progress import LayerProgress
    from quantmill.quantize.gguf.tensor_error import quantization_error, row_bytes, sampled_rows

    reader = GGUFReader(source)
    costs: list[TensorCost] = []
    fixed = fixed_padded = fixed_elements = 0
    tensors = sorted(reader.tensors, key=lambda t: t.name)
    todo = [t for t in tensors if quantized_by_libllama(t.name, len(t.shape))]
    bar = LayerProgress("mix: measuring tensors", len(todo), 0, bars=False)
    for tensor in tensors:
        shape = tuple(int(d) for d in tensor.shape)
        if tensor not in todo:
            fixed += int(tensor.n_bytes)
            fixed_padded += _padded(int(tensor.n_bytes))
            fixed_elements += int(tensor.n_elements)
            continue
        n_per_row = shape[0]
        rows = int(np.prod(shape[1:]))
        weights = np.asarray(tensor.data).reshape(rows, n_per_row)
        picked = sampled_rows(rows, max_rows)
        sample = weights[picked].astype(np.float32)
        importance = means.get(tensor.name)
        if importance is not None and importance.shape != (n_per_row,):
            importance = None  # a stacked (3-D) tensor's matrices have one row of means each: measured unweighted
        scale = rows / len(picked)
        options = [Option(t.name, row_bytes(t, n_per_row) * rows, scale * quantization_error(sample, t, importance, threads))
                   for t in candidate_types(n_per_row, types)]
        if not options:
            raise InputFileError(source, f"tensor {tensor.name!r}: rows of {n_per_row} fit no candidate type's blocks",
                                 "quantize this model with a plain --type")
        costs.append(TensorCost(tensor.name, shape, sorted(options, key=lambda o: (o.n_bytes, o.error, o.type_name))))
        bar.advance(tensor.name)
    bar.close()
    return costs, Fixed(fixed, fixed_padded, fixed_elements, int(reader.data_offset))


@dataclass(frozen=True)
class Fixed:
    """What a mix does not choose: the tensors libllama copies (norms), and the file's header."""

    n_bytes: int
    padded: int  # each tensor padded to the alignment
    n_elements: int
    header_bytes: int  # metadata and tensor infos of the source, where its tensor data starts


def _hull(options: list[Option], gain: float) -> list[Option]:
    """The options on the lower convex hull of (bytes, gain·error), by bytes: each step saves less per byte."""
    points: list[Option] = []
    for option in options:
        if points and option.error >= points[-1].error:
            continue  # more bytes, no less error
        if points and option.n_bytes == points[-1].n_bytes:
            points.pop()
        while len(points) >= 2:
            a, b = points[-2], points[-1]
            # b is above the line from a to option: drop it
            if (b.error - a.error) * (option.n_bytes - a.n_bytes) >= (option.error - a.error) * (b.n_bytes - a.n_bytes):
                points.pop()
            else:
                break
        points.append(option)
    return points


def choose_types(costs: Sequence[TensorCost], budget: int) -> dict[str, str]:
    """The type per tensor minimising Σ gain·error with Σ padded bytes ≤ ``budget`` (see the module docstring)."""
    hulls = {c.name: _hull(c.options, c.gain) for c in costs}
    gains = {c.name: c.gain for c in costs}
    at = dict.fromkeys(hulls, 0)
    used = sum(_padded(h[0].n_bytes) for h in hulls.values())
    if used > budget:
        raise UserInputError(f"the budget leaves {budget} bytes for the weights but the smallest types need {used}; "
                             "raise --target-size / --target-bpw")
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        hull, i = hulls[name], at[name]
        if i + 1 < len(hull):
            saved = gains[name] * (hull[i].error - hull[i + 1].error)
            extra = _padded(hull[i + 1].n_bytes) - _padded(hull[i].n_bytes)
            heapq.heappush(heap, (-saved / max(extra, 1), name))

    for name in sorted(hulls):
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        hull, i = hulls[name], at[name]
        extra = _padded(hull[i + 1].n_bytes) - _padded(hull[i].n_bytes)
        if used + extra > budget:
            continue  # this tensor's next step does not fit; others' may
        used += extra
        at[name] = i + 1
        push(name)
    return {name: hulls[name][at[name]].type_name for name in sorted(hulls)}


def _budget(target: MixTarget, fixed: Fixed, n_elements: int) -> int:
    if target.size is not None:
        return target.size - fixed.header_bytes - HEADER_MARGIN - fixed.padded
    assert target.bpw is not None
    # bpw counts unpadded tensor bytes; the chosen tensors' padding is at most GGUF_ALIGNMENT each, a rounding error
    return int(target.bpw * n_elements / 8) - fixed.n_bytes


def is_mix_report(path: Path) -> bool:
    """Whether ``path`` is a mix report ``quantize gguf --report`` wrote (so writing it again is expected)."""
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"name", "target", "types", "method"} <= set(data)


def mix_output_path(source: Path, target: MixTarget, output: str | Path | None) -> Path:
    """``--out``, or the source's name with its type suffix replaced by the mix's name (``X-F16.gguf`` → ``X-QM-5.0.gguf``)."""
    from quantmill.quantize.gguf.libllama import output_stem

    return Path(output) if output is not None else source.with_name(f"{output_stem(source)}-{target.label}.gguf")


def choose_mix(source: str | Path, imatrix: str | Path, target: MixTarget, *, max_rows: int | None = DEFAULT_MAX_ROWS,
               types: Sequence[str] = CANDIDATE_TYPES, threads: int = 1, refine_with: Path | None = None,
               refine_tokens: tuple[int, int] | None = None, token_ids: np.ndarray | None = None,
               gains: dict[str, float] | None = None, output: str | Path | None = None, progress: bool = False) -> MixPlan:
    """Measure every tensor's options (and, with ``refine_with``, its gain) and choose the mix; nothing is written.

    ``refine_with`` is the float checkpoint the GGUF was made from; the gains are measured on ``token_ids`` or, when
    None, on ``refine_tokens`` = (samples, seqlen) of the bundled calibration corpus (seed 0; default
    sensitivity.DEFAULT_REFINE_TOKENS). ``gains`` are gains measured before (a refined plan's ``record()["gains"]``:
    they do not depend on the budget), used instead of measuring them again."""
    from quantmill.outputs import check_output, gguf_signature
    from quantmill.quantize.gguf.imatrix import imatrix_means, read_imatrix
    from quantmill.quantize.gguf.inspect import check_gguf_magic

    source, imatrix = Path(source), Path(imatrix)
    check_gguf_magic(source)
    check_output(mix_output_path(source, target, output), kind="file", flag="--out", command="quantize gguf",
                 inputs=[source, imatrix], owned=gguf_signature)
    started = time.perf_counter()
    means = imatrix_means(read_imatrix(imatrix))
    costs, fixed = measure_costs(source, means, max_rows=max_rows, types=types, threads=threads)
    method: dict[str, Any] = {"objective": "imatrix-weighted squared error", "candidates": list(types),
                              "rows_measured_per_tensor": max_rows}
    if gains is not None:
        missing = sorted({c.name for c in costs} - set(gains))
        if missing:
            raise UserInputError(f"--gains-from: no gain for tensor {missing[0]!r} ({len(missing)} missing); "
                                 "measure them with --refine for this model")
        method |= {"objective": "imatrix-weighted squared error x KLD gain (one tensor at a time)", "gains": "given"}
    elif refine_with is not None:
        from quantmill.quantize.gguf.sensitivity import (
            DEFAULT_REFINE_TOKENS,
            PROBE_TYPES,
            measure_gains,
            probe_type,
            refinement_tokens,
        )

        ids = token_ids if token_ids is not None else refinement_tokens(refine_with, *(refine_tokens or DEFAULT_REFINE_TOKENS))
        probes = [(c.name, probe_type([o.type_name for o in c.options])) for c in costs]
        gains = measure_gains(refine_with, source, means, probes, ids, threads=threads, progress=progress)
        method |= {"objective": "imatrix-weighted squared error x KLD gain (one tensor at a time)",
                   "gain_probe_types": list(PROBE_TYPES), "gain_tokens": list(ids.shape)}
    for cost in costs:
        cost.gain = gains[cost.name] if gains is not None else 1.0
    n_elements = sum(c.n_elements for c in costs) + fixed.n_elements
    budget = _budget(target, fixed, n_elements)
    chosen = choose_types(costs, budget)
    plan = MixPlan(source, imatrix, target, costs, chosen, budget, fixed.n_bytes, fixed.padded, fixed.header_bytes + HEADER_MARGIN,
                   n_elements,
                   gains is not None, time.perf_counter() - started, method)
    LOG.info("mix %s: %d tensors, %.3f bpw, predicted %s %.4g", target.label, len(costs), plan.bpw,
             "KLD" if plan.refined else "error", plan.predicted)
    return plan


def file_type_for(types: dict[str, str], costs: Sequence[TensorCost]) -> str:
    """The file type llama.cpp would name a file of these types by: the type holding the most weights."""
    from quantmill.quantize.gguf.types import FILE_TYPES

    weights: dict[str, int] = {}
    for cost in costs:
        weights[types[cost.name]] = weights.get(types[cost.name], 0) + cost.n_elements
    for type_name, _ in sorted(weights.items(), key=lambda kv: (-kv[1], kv[0])):
        for row in FILE_TYPES.values():
            if row.base_type_name == type_name:
                return row.name
    return "Q8_0"


def overrides_for(types: dict[str, str]) -> Iterator[str]:
    """``REGEX=TYPE`` per tensor, anchored on its whole name."""
    for name, type_name in types.items():
        yield f"^{re.escape(name)}$={type_name}"


def write_mix(plan: MixPlan, output: str | Path | None = None, *, threads: int | None = None,
              progress: bool = False) -> QuantizeResult:
    """Write the planned mix through libllama; refuses a result over the budget (it is removed)."""
    from quantmill.errors import ToolError
    from quantmill.quantize.gguf.libllama import parse_overrides, quantize_gguf
    from quantmill.quantize.gguf.types import lookup_file_type

    file_type = lookup_file_type(file_type_for(plan.types, plan.costs))
    target = mix_output_path(plan.source, plan.target, output)
    keys: list[tuple[str, int | str]] = [(f"{KEY_PREFIX}name", plan.target.label),
                                         (f"{KEY_PREFIX}target", plan.target.describe()),
                                         (f"{KEY_PREFIX}method", "knapsack/" + ("kld-gain" if plan.refined else "imatrix-error")),
                                         (f"{KEY_PREFIX}predicted", f"{'kld' if plan.refined else 'error'} {plan.predicted:.6g}")]
    result = quantize_gguf(plan.source, file_type, target, overrides=parse_overrides(list(overrides_for(plan.types))),
                           threads=threads, imatrix=plan.imatrix, progress=progress, extra_keys=keys)
    written = result.summary.tensor_types()
    wrong = sorted(n for n, t in plan.types.items() if written.get(n) != t)
    over = (plan.target.size is not None and result.summary.file_size > plan.target.size) or (
        plan.target.bpw is not None and result.summary.bpw > plan.target.bpw + 1e-9)
    if wrong or over:
        result.output.unlink(missing_ok=True)
        what = (f"{len(wrong)} tensors did not get their planned type (e.g. {wrong[0]}: {written.get(wrong[0])} "
                f"instead of {plan.types[wrong[0]]})" if wrong else
                f"the file is over its budget ({result.summary.file_size} bytes, {result.summary.bpw:.4f} bpw)")
        raise ToolError(f"{target}: libllama wrote another mix than planned: {what}; this is a quantmill bug")
    return result

