"""What one architecture record holds: everything any stage needs to know about one model family.

A record is an :class:`Architecture` subclass in its own module of this package (``llama.py``,
``falcon.py``, ``lckv.py``, ``qwen.py``), listed once in :mod:`quantmill.convert.arch`:

* **identity**: the family ``name``, the HF ``architectures`` names and ``model_type`` values it
  answers to;
* **capabilities**: ``stages``, the stages it supports (:data:`CAPABILITIES`); a recipe whose
  model cannot go through one of its stages is refused before any work (:meth:`require`);
* **HF → GGUF**: the GGUF architecture, row transforms (as row permutations, so tensors can be
  streamed in row chunks), generated tensors (``rope_freqs``), hyper-parameter keys, tokenizer
  kinds and vocabulary adjustments;
* **GGUF → HF** (``gguf_to_hf``, where the family has it): the HF class; tensor names are derived
  from gguf-py's ``TensorNameMap`` over the HF class's own state-dict names;
* **the layer-by-layer pass** (``decoder``): transformers' config, decoder-layer and rotary classes,
  the linear groups (shared inputs; GPTQ's true-sequential groups), the GPTQ flow and its layout;
* **verify**: ``torch_runtime``, what runs a float or dequantized checkpoint in torch
  (transformers' own class, or quantmill's LCKV reference forward).

config.json is always read as data: ``transformers_config`` turns it into the fields transformers'
config class takes (RefinedWeb configs into Falcon ones); no ``auto_map`` code is ever run.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from quantmill.errors import UnsupportedError

if TYPE_CHECKING:  # gguf-py and numpy load when a record converts, not when one is read (quantize gguf reads one)
    import gguf
    import numpy as np

HParams = dict[str, Any]
# (hparams, tensor shape) -> row order: output row i is input row perm[i].
RowTransform = Callable[[HParams, tuple[int, ...]], "np.ndarray"]

# Every capability a record can claim, in pipeline order, with what it means.
CAPABILITIES: dict[str, str] = {
    "convert": "HF → GGUF conversion (f32/f16/bf16/q8_0)",
    "gguf-to-hf": "GGUF → Hugging Face checkpoint",
    "merge": "LoRA merge into the base weights",
    "bake": "RoPE scaling baked into config.json",
    "statistics": "the layer-by-layer statistics pass (importance matrix)",
    "gptq": "GPTQ quantization",
    "gguf-quantize": "GGUF quantization through libllama (K-quants, legacy types)",
    "gguf-mix-gains": "a budgeted GGUF mix's KLD gains, measured one tensor at a time in torch",
    "verify-gguf": "verification of GGUF files in llama.cpp",
    "verify-torch": "verification of float and GPTQ checkpoints in torch",
}
FlowKind = Literal["pre-norm", "generic", "lckv"]


@dataclass(frozen=True)
class PreNormLayout:
    """Module names of a pre-norm residual decoder layer and its four true-sequential groups."""

    attn_norm: str
    attn: str
    attn_out: str
    mlp_norm: str
    mlp: str
    mlp_out: str
    attn_in: tuple[str, ...]
    mlp_in: tuple[str, ...]

    @property
    def groups(self) -> tuple[tuple[str, ...], ...]:
        return (self.attn_in, (self.attn_out,), self.mlp_in, (self.mlp_out,))


@dataclass(frozen=True)
class DecoderSpec:
    """How the layer-by-layer passes (statistics, GPTQ) rebuild and walk one decoder layer.

    ``classes`` returns transformers' (config class, decoder-layer class, rotary-embedding class);
    it imports them when called, so reading a record never imports transformers.
    """

    classes: Callable[[], tuple[Any, Any, Any]]
    # linears of one layer in execution order, grouped by shared input (q/k/v read the same normed
    # hidden states): GPTQ's true-sequential groups, and one statistics collector each
    linear_groups: tuple[tuple[str, ...], ...]
    flow: FlowKind = "generic"
    pre_norm: PreNormLayout | None = None  # for flow "pre-norm"
    embed_weight: str = "model.embed_tokens.weight"
    layer_prefix: str = "model.layers.{index}."
    # extra keyword arguments of the layer's forward (Falcon's alibi / attention_mask have no default)
    layer_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(name for group in self.linear_groups for name in group)

    def hf_linear_name(self, index: int, linear: str) -> str:
        """Full checkpoint module name, e.g. ``model.layers.3.self_attn.q_proj``."""
        return self.layer_prefix.format(index=index) + linear


@dataclass(frozen=True)
class GgufToHfSpec:
    """How a GGUF file of this family becomes a Hugging Face checkpoint."""

    model_type: str
    hf_class: str
    model_class: Callable[[], Any]  # transformers' causal-LM class (imported when called)
    # GGUF layer tensor suffix -> config field giving the head count whose rotary rows llama.cpp permuted
    permuted_rows: Mapping[str, str] = field(default_factory=dict)


class Architecture:
    """One model family. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    hf_architectures: ClassVar[tuple[str, ...]] = ()
    model_types: ClassVar[tuple[str, ...]] = ()
    stages: ClassVar[frozenset[str]] = frozenset()
    gguf_name: ClassVar[str]  # the GGUF architecture (general.architecture), as llama.cpp names it
    # Per GGUF tensor kind (a gguf.MODEL_TENSOR member name, e.g. "ATTN_Q"), a row permutation applied before writing.
    row_transforms: ClassVar[Mapping[str, RowTransform]] = {}
    # Tokenizer kinds this family ships with (see quantmill.convert.vocab.VOCAB_KINDS).
    vocab_kinds: ClassVar[tuple[str, ...]] = ("sentencepiece", "bpe")
    # HF tensors that carry no weights llama.cpp needs.
    skip_suffixes: ClassVar[tuple[str, ...]] = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")
    # GGUF keys of a family stored under another family's GGUF architecture start with this (LCKV: "lckv.")
    gguf_key_prefix: ClassVar[str | None] = None
    decoder: ClassVar[DecoderSpec | None] = None
    gguf_to_hf: ClassVar[GgufToHfSpec | None] = None
    torch_runtime: ClassVar[Literal["transformers", "lckv"]] = "transformers"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        unknown = sorted(set(cls.stages) - set(CAPABILITIES))
        if unknown:
            raise TypeError(f"{cls.__name__}.stages names unknown capabilities {unknown}; known: {', '.join(CAPABILITIES)}")
        if ("statistics" in cls.stages or "gptq" in cls.stages) and cls.decoder is None:
            raise TypeError(f"{cls.__name__} claims the layer-by-layer stages but has no decoder spec")
        if "gguf-to-hf" in cls.stages and cls.gguf_to_hf is None:
            raise TypeError(f"{cls.__name__} claims gguf-to-hf but has no gguf_to_hf spec")

    @property
    def gguf_arch(self) -> gguf.MODEL_ARCH:
        """gguf-py's enum member for :attr:`gguf_name`."""
        import gguf

        return next(arch for arch, name in gguf.MODEL_ARCH_NAMES.items() if name == self.gguf_name)

    def supports(self, capability: str) -> bool:
        return capability in self.stages

    def require(self, capability: str, config_path: Path | str) -> None:
        """Refuse a stage this family cannot go through, naming the stage and the architecture."""
        if capability not in CAPABILITIES:
            raise KeyError(f"unknown capability {capability!r}")
        if capability not in self.stages:
            able = sorted(c for c in CAPABILITIES if c in self.stages)
            raise UnsupportedError(
                f"{config_path}: architecture {self.name!r} does not support {CAPABILITIES[capability]} "
                f"(stage {capability!r}); it supports: {', '.join(able)}"
            )

    def transformers_config(self, config: Mapping[str, Any], config_path: Path) -> dict[str, Any]:
        """config.json as the fields transformers' config class for this family takes (as data)."""
        return dict(config)

    def read_hparams(self, config: dict[str, Any], config_path: Path) -> HParams:
        """Validate config.json and fill the defaults transformers would apply."""
        raise NotImplementedError

    def block_count(self, hparams: HParams) -> int:
        return int(hparams["num_hidden_layers"])

    def check_checkpoint(self, hparams: HParams, tensor_names: set[str], model_dir: Path) -> None:
        """Refuse a checkpoint whose tensors contradict its config (before anything is written)."""

    def tensor_name_map(self, hparams: HParams) -> gguf.TensorNameMap:
        import gguf

        return gguf.get_tensor_name_map(self.gguf_arch, self.block_count(hparams))

    def extra_tensors(self, hparams: HParams) -> list[tuple[gguf.MODEL_TENSOR, np.ndarray]]:
        """Tensors generated from the config (written before the checkpoint's own)."""
        return []

    def write_hparams(self, writer: gguf.GGUFWriter, hparams: HParams, file_type: gguf.LlamaFileType) -> None:
        raise NotImplementedError

    def adjust_vocab_keys(self, writer: gguf.GGUFWriter, hparams: HParams) -> None:
        """Architecture-specific tokenizer keys written after the vocabulary."""
