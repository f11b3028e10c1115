"""GPTQ branch specifications: the short CLI form, the release branch name, and the validation.

A branch is one quantized checkpoint (bits, group size, act-order, symmetry, static groups, grid).
Short specs, as given to ``--branch``::

    4bit-128g-actorder        8bit-none-actorder      3bit-64g
    4bit-64g-actorder-asym    4bit-128g-actorder-static
    4bit-64g-actorder-mse     (per-group grids by the clipping search, quantmill.quantize.gptq.grid)
    4bit-32g-actorder-ct      (the same codes in the compressed-tensors layout vLLM reads)
    main=4bit-128g-actorder   (written to the branch ``main`` instead of its release name)

Release names are those of the well-known "Provided files" releases::

    gptq-4bit-128g-actorder_True   gptq-8bit--1g-actorder_True   gptq-3bit-64g-actorder_False

(``-1g`` is "no grouping"). Asymmetric, static-group and mse-grid branches, which those releases do
not have, append ``-asym`` / ``-static`` / ``-mse``; a compressed-tensors branch appends ``-compressed-tensors``.
A release name is accepted as a spec too.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from quantmill.errors import UserInputError
from quantmill.outputs import check_name
from quantmill.quantize.gptq.formats import DEFAULT_FORMAT, FORMAT_WORDS, CheckpointFormat, checkpoint_format
from quantmill.quantize.gptq.grid import GRIDS, MSE_MIN_SHRINK, MSE_STEPS, GridOptions

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128)  # -1: one group over the whole input dimension
DEFAULT_DAMP_PERCENT = 0.01
DEFAULT_BLOCK_SIZE = 128

# flag word in a spec -> (field, value); the spec grammar is: BITS GROUP FLAG*
FLAG_WORDS: dict[str, tuple[str, bool | str]] = {
    "actorder": ("desc_act", True),
    "actorder_true": ("desc_act", True),
    "actorder_false": ("desc_act", False),
    "noactorder": ("desc_act", False),
    "sym": ("sym", True),
    "asym": ("sym", False),
    "static": ("static_groups", True),
    "mse": ("grid", "mse"),
    "minmax": ("grid", "minmax"),
}
DEFAULT_GRID = "minmax"
GROUP_WORDS: dict[str, int] = {"none": -1, "-1g": -1, "nogroup": -1}


@dataclass(frozen=True)
class BranchSpec:
    """What one GPTQ branch is quantized with. ``group_size`` -1 means no grouping."""

    bits: int
    group_size: int
    desc_act: bool = False
    sym: bool = True
    static_groups: bool = False
    damp_percent: float = DEFAULT_DAMP_PERCENT
    true_sequential: bool = True
    block_size: int = DEFAULT_BLOCK_SIZE
    name_override: str | None = None
    format: str = "gptq"  # a key of quantmill.quantize.gptq.formats.FORMATS
    grid: str = DEFAULT_GRID  # a key of quantmill.quantize.gptq.grid.GRIDS
    grid_min_shrink: float = MSE_MIN_SHRINK  # the mse search's smallest range, as a fraction of min/max's
    grid_steps: int = MSE_STEPS  # the mse search's shrink factors after 1.0

    def __post_init__(self) -> None:
        checkpoint_format(self.format)
        if self.grid not in GRIDS:
            raise UserInputError(f"--branch: grid {self.grid!r} is not known; choose one of {', '.join(GRIDS)}")
        if not 0.0 < self.grid_min_shrink < 1.0:
            raise UserInputError(f"grid search range {self.grid_min_shrink}: the smallest shrink must be in (0, 1), e.g. 0.2")
        if self.grid_steps < 1:
            raise UserInputError(f"grid search steps {self.grid_steps}: must be at least 1, e.g. {MSE_STEPS}")
        if self.bits not in SUPPORTED_BITS:
            raise UserInputError(
                f"--branch: {self.bits}-bit GPTQ is not supported; choose bits from {', '.join(map(str, SUPPORTED_BITS))}"
            )
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise UserInputError(
                f"--branch: group size {self.group_size} is not supported; choose 32g, 64g, 128g or none"
            )
        if not 0.0 < self.damp_percent <= 1.0:
            raise UserInputError(f"--damp {self.damp_percent}: must be in (0, 1], e.g. 0.01")
        if self.block_size < 1:
            raise UserInputError(f"block size {self.block_size}: must be at least 1")
        if self.name_override is not None:
            check_name(self.name_override, "--branch: branch name")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def release_name(self) -> str:
        """The branch name of the well-known releases, e.g. ``gptq-4bit-128g-actorder_True``."""
        name = f"gptq-{self.bits}bit-{self.group_size}g-actorder_{self.desc_act}"
        if not self.sym:
            name += "-asym"
        if self.static_groups:
            name += "-static"
        if self.grid != DEFAULT_GRID:
            name += f"-{self.grid}"
        return name + self.checkpoint_format.suffix

    @property
    def grid_options(self) -> GridOptions:
        return GridOptions(self.grid, self.grid_min_shrink, self.grid_steps)

    def grid_record(self) -> dict[str, Any]:
        """quantmill's record of the grid in quantization_config: nothing for min/max (the config every v1 loader
        knows); for the search ``grid``, ``grid_shrink_range`` and ``grid_steps``, which loaders ignore."""
        if self.grid == DEFAULT_GRID:
            return {}
        return {"grid": self.grid, "grid_shrink_range": [self.grid_min_shrink, 1.0], "grid_steps": self.grid_steps,
                "grid_stride": self.grid_options.stride}

    def gptqmodel_meta(self) -> dict[str, Any]:
        """The grid as GPTQModel 7.6 records its own in ``meta``: ``mse``, the norm of the error the search minimised
        (ours: the Hessian-weighted square, 2.0); nothing for min/max (GPTQModel's ``mse`` 0.0)."""
        return {} if self.grid == DEFAULT_GRID else {"mse": 2.0}

    @property
    def checkpoint_format(self) -> CheckpointFormat:
        """The :class:`~quantmill.quantize.gptq.formats.CheckpointFormat` record the branch is written in."""
        return checkpoint_format(self.format)

    @property
    def name(self) -> str:
        """The directory / Hub branch this spec is written to."""
        return self.name_override or self.release_name

    @property
    def short(self) -> str:
        """The short spec that parses back to this branch (without the damp)."""
        group = "none" if self.group_size == -1 else f"{self.group_size}g"
        words = [f"{self.bits}bit", group] + (["actorder"] if self.desc_act else [])
        words += ([] if self.sym else ["asym"]) + (["static"] if self.static_groups else [])
        words += [self.grid] if self.grid != DEFAULT_GRID else []
        words += [self.checkpoint_format.word] if self.checkpoint_format.word else []
        text = "-".join(words)
        return f"{self.name_override}={text}" if self.name_override else text

    def quantization_config(self) -> dict[str, Any]:
        """The fields loaders read, as AutoGPTQ / GPTQModel write them (v1 checkpoint format)."""
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "damp_percent": self.damp_percent,
            "desc_act": self.desc_act,
            "static_groups": self.static_groups,
            "sym": self.sym,
            "true_sequential": self.true_sequential,
            "lm_head": False,
            "model_name_or_path": None,
            "model_file_base_name": "model",
            "quant_method": "gptq",
            "checkpoint_format": "gptq",
            "pack_dtype": "int32",
            **self.grid_record(),
        }


def _split_words(text: str) -> list[str]:
    """``4bit--1g-actorder_True`` -> ``['4bit', '-1g', 'actorder_true']`` (``-1g`` kept whole)."""
    lowered = text.strip().lower().replace("--1g", "-@1g").replace("compressed-tensors", "ct")
    return [w.replace("@", "-") for w in lowered.split("-") if w]


def parse_branch(spec: str, *, damp_percent: float = DEFAULT_DAMP_PERCENT, true_sequential: bool = True,
                 format: str | None = None) -> BranchSpec:
    """Parse a short spec (``4bit-128g-actorder``, ``main=4bit-64g``) or a release name.

    ``format`` (e.g. the CLI's ``--format``) applies to a spec that does not name one itself."""
    raw = spec.strip()
    name: str | None = None
    if "=" in raw:
        name, raw = (part.strip() for part in raw.split("=", 1))
    body = raw[len("gptq-"):] if raw.lower().startswith("gptq-") else raw
    words = _split_words(body)
    hint = "write e.g. 4bit-128g-actorder, 8bit-none-actorder, 3bit-64g, 4bit-64g-actorder-asym or 4bit-64g-actorder-mse"
    if len(words) < 2:
        raise UserInputError(f"--branch {spec!r}: needs bits and group size; {hint}")
    bits_match = re.fullmatch(r"(\d+)bits?", words[0])
    if bits_match is None:
        raise UserInputError(f"--branch {spec!r}: {words[0]!r} is not a bit width; {hint}")
    group_word = words[1]
    group_match = re.fullmatch(r"(\d+)g", group_word)
    if group_word in GROUP_WORDS:
        group = GROUP_WORDS[group_word]
    elif group_match is not None:
        group = int(group_match.group(1))
    else:
        raise UserInputError(f"--branch {spec!r}: {group_word!r} is not a group size; {hint}")
    fields: dict[str, Any] = {}
    named_format: str | None = None
    for word in words[2:]:
        if word in FORMAT_WORDS:
            named_format = FORMAT_WORDS[word]
            continue
        if word not in FLAG_WORDS:
            known = ", ".join(sorted([*FLAG_WORDS, *FORMAT_WORDS]))
            raise UserInputError(f"--branch {spec!r}: unknown word {word!r} (known: {known}); {hint}")
        key, value = FLAG_WORDS[word]
        if key in fields and fields[key] != value:
            raise UserInputError(f"--branch {spec!r}: contradicts itself about {key}")
        fields[key] = value
    return BranchSpec(
        bits=int(bits_match.group(1)),
        group_size=group,
        damp_percent=damp_percent,
        true_sequential=true_sequential,
        name_override=name,
        format=named_format or format or DEFAULT_FORMAT,
        **fields,
    )


def parse_branches(specs: list[str] | tuple[str, ...], **kwargs: Any) -> list[BranchSpec]:
    """Parse every ``--branch``; names must be distinct. Order is kept (it is the CLI's order)."""
    branches = [parse_branch(s, **kwargs) for s in specs]
    if not branches:
        raise UserInputError("no --branch given; add e.g. --branch 4bit-128g-actorder")
    seen: dict[str, str] = {}
    for spec, branch in zip(specs, branches, strict=True):
        if branch.name in seen:
            raise UserInputError(f"--branch {spec!r} and --branch {seen[branch.name]!r} both write branch {branch.name!r}")
        seen[branch.name] = spec
    return branches
