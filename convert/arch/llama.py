"""The llama family: Llama 1/2/3/3.1, Mistral, TinyLlama, OpenLLaMA, LongLLaMA (as plain llama).

config.json is read as data. For the model types transformers knows (``llama``,
``mistral``) the defaults its config classes fill in are applied first, because
llama.cpp's converter reads the config through transformers and writes what it sees
(``head_dim`` → ``attention.key_length``, a missing ``rope_theta`` → 10000). Fields
this converter does not use are ignored, except LongLLaMA's Focused-Transformer fields
(``mem_layers``, ``mem_dtype``, ``last_context_length`` ...): a LongLLaMA checkpoint runs
as plain llama (its memory layers need a runtime llama.cpp does not have), and those
fields are kept as ``longllama.*`` keys (see :mod:`.extra_keys`).

RoPE: ``linear`` and ``yarn`` become ``rope.scaling.*`` keys (``yarn`` with factor 1, i.e.
NTK-YaRN as ``quantmill bake`` writes it, becomes scaling type ``none`` plus
``rope.scaling.attn_factor``, which llama.cpp applies for every architecture); ``llama3`` becomes the
generated ``rope_freqs`` tensor (per-frequency divisors, computed in float32 exactly
as llama.cpp's converter does); ``dynamic`` is dropped, as llama.cpp has no runtime
support for it; any other type is refused.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from quantmill.convert.arch.base import Architecture, DecoderSpec, GgufToHfSpec, HParams, PreNormLayout
from quantmill.convert.arch.extra_keys import add_config_fields
from quantmill.convert.arch.fields import check_fields, check_rope
from quantmill.convert.arch.registry import register
from quantmill.errors import InputFileError, UnsupportedError

if TYPE_CHECKING:
    import gguf
    import numpy as np

# What transformers' LlamaConfig / MistralConfig fill in for absent fields (transformers 5).
TRANSFORMERS_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"vocab_size": 32000, "intermediate_size": 11008, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6},
    "mistral": {"vocab_size": 32000, "intermediate_size": 14336, "max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-6},
}
DEFAULT_KV_HEADS: dict[str, int | None] = {"llama": None, "mistral": 8}  # None: same as attention heads
DEFAULT_ROPE_THETA = 10000.0
REQUIRED_INT_FIELDS = ("hidden_size", "num_attention_heads", "num_hidden_layers")

# First key present wins (llama.cpp's search order).
CONTEXT_KEYS = ("max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length", "model_max_length")
FFN_KEYS = ("prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size", "n_inner", "hidden_dim")
# LongLLaMA (Focused Transformer) fields kept as longllama.* keys when present
FOT_FIELDS = ("gradient_checkpoint_every_ith", "last_context_length", "mem_attention_grouping", "mem_dtype", "mem_layers",
              "mem_positionals", "torch_attention")
FOT_PREFIX = "longllama"
ROPE_THETA_KEYS = ("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base")


def _first(hp: HParams, keys: tuple[str, ...]) -> Any:
    return next((hp[k] for k in keys if k in hp), None)


def rope_parameters_from_config(config: dict[str, Any], known_to_transformers: bool) -> dict[str, Any]:
    """``rope_parameters`` as transformers 5 reads them (legacy ``rope_scaling``/``rope_theta`` folded in)."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if known_to_transformers:
        rope.setdefault("rope_type", rope.get("type", "default"))
        rope.setdefault("rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA))
        return rope
    if "rope_theta" not in rope and (theta := _first(config, ROPE_THETA_KEYS)) is not None:
        rope["rope_theta"] = theta
    if "rope_type" not in rope and rope.get("type") is not None:
        rope["rope_type"] = rope["type"]
    if "original_max_position_embeddings" not in rope and "original_max_position_embeddings" in config:
        rope["original_max_position_embeddings"] = config["original_max_position_embeddings"]
    return rope


def permute_rows(n_head: int, rows: int) -> np.ndarray:
    """Row order that turns HF's rotate-half Q/K layout into llama.cpp's interleaved pairs."""
    import numpy as np

    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


def _permute_q(hp: HParams, shape: tuple[int, ...]) -> np.ndarray:
    return permute_rows(hp["num_attention_heads"], shape[0])


def _permute_k(hp: HParams, shape: tuple[int, ...]) -> np.ndarray:
    return permute_rows(hp.get("num_key_value_heads") or hp["num_attention_heads"], shape[0])


def llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1 RoPE scaling, as float32 (the ``rope_freqs`` tensor).

    Float32 arithmetic in the order llama.cpp's converter evaluates it with torch (where
    ``k / t`` is ``reciprocal(t) * k``). The power is rounded from float64: torch's float32
    power is not always correctly rounded, so for some head dims a value can differ from
    llama.cpp's by one unit in the last place; for Llama 3.1/3.2's parameters they agree.
    """
    import numpy as np

    f32 = np.float32
    base = rope.get("rope_theta", DEFAULT_ROPE_THETA)
    factor = rope.get("factor", 8.0)
    low = rope.get("low_freq_factor", 1.0)
    high = rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    exponents = np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim)
    freqs = f32(1.0) / np.power(np.float64(base), exponents.astype(np.float64)).astype(f32)
    factors: list[np.float32] = []
    for freq in freqs:
        wavelen = (f32(1) / freq) * f32(2 * math.pi)
        if wavelen < f32(old_ctx / high):
            factors.append(f32(1))
        elif wavelen > f32(old_ctx / low):
            factors.append(f32(factor))
        else:
            smooth = ((f32(1) / wavelen) * f32(old_ctx) - f32(low)) / f32(high - low)
            factors.append(f32(1) / ((f32(1) - smooth) / f32(factor) + smooth))
    return np.array(factors, dtype=f32)


def _llama_classes() -> tuple[Any, Any, Any]:
    from transformers.models.llama import modeling_llama

    return modeling_llama.LlamaConfig, modeling_llama.LlamaDecoderLayer, modeling_llama.LlamaRotaryEmbedding


def _llama_model_class() -> Any:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM


# The llama decoder layer: h' = h + attn(norm1(h)), out = h' + mlp(norm2(h')).
LLAMA_LAYOUT = PreNormLayout(
    attn_norm="input_layernorm", attn="self_attn", attn_out="self_attn.o_proj",
    mlp_norm="post_attention_layernorm", mlp="mlp", mlp_out="mlp.down_proj",
    attn_in=("self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"), mlp_in=("mlp.gate_proj", "mlp.up_proj"),
)
LLAMA_STAGES = frozenset(
    {"convert", "gguf-to-hf", "merge", "bake", "statistics", "gptq", "gguf-quantize", "gguf-mix-gains",
     "verify-gguf", "verify-torch"}
)


@register(
    "LlamaForCausalLM", "LLaMAForCausalLM", "MistralForCausalLM", "LongLlamaForCausalLM",
    model_types=("llama", "mistral", "longllama"),
)
class LlamaArchitecture(Architecture):
    """Llama 1/2/3/3.1, Mistral, TinyLlama, OpenLLaMA and LongLLaMA (as plain llama)."""

    name = "llama"
    stages = LLAMA_STAGES
    gguf_name = "llama"
    row_transforms = {"ATTN_Q": _permute_q, "ATTN_K": _permute_k}
    decoder = DecoderSpec(_llama_classes, LLAMA_LAYOUT.groups, flow="pre-norm", pre_norm=LLAMA_LAYOUT)
    gguf_to_hf: ClassVar[GgufToHfSpec | None] = GgufToHfSpec(
        "llama", "LlamaForCausalLM", _llama_model_class,
        permuted_rows={"attn_q.weight": "num_attention_heads", "attn_k.weight": "num_key_value_heads"},
    )

    def transformers_config(self, config: Mapping[str, Any], config_path: Path) -> dict[str, Any]:
        """Mistral and LongLLaMA run as transformers' llama/mistral classes; LongLLaMA's FoT fields are ignored there."""
        out = dict(config)
        if out.get("model_type") == "longllama":
            out["model_type"] = "llama"
        return out

    def read_hparams(self, config: dict[str, Any], config_path: Path) -> HParams:
        model_type = config.get("model_type")
        known = model_type in TRANSFORMERS_DEFAULTS
        hp: HParams = {**TRANSFORMERS_DEFAULTS.get(str(model_type), {}), **config}
        check_fields(hp, config_path, REQUIRED_INT_FIELDS)
        if known and "num_key_value_heads" not in config:
            hp["num_key_value_heads"] = DEFAULT_KV_HEADS[str(model_type)] or hp["num_attention_heads"]
        if known and hp.get("num_key_value_heads") is None:
            hp["num_key_value_heads"] = hp["num_attention_heads"]
        n_head, n_kv = hp["num_attention_heads"], hp.get("num_key_value_heads") or hp["num_attention_heads"]
        if n_head % n_kv:
            raise InputFileError(config_path, f"num_attention_heads {n_head} is not a multiple of num_key_value_heads {n_kv}", "fix config.json")
        if known and hp.get("head_dim") is None:
            hp["head_dim"] = hp["hidden_size"] // n_head
        if "vocab_size" not in hp:
            raise InputFileError(config_path, "field 'vocab_size' is missing", "add the embedding row count as vocab_size")
        hp["rope_parameters"] = rope_parameters_from_config(config, known)
        check_rope_type(hp["rope_parameters"], config_path)
        return hp

    def head_dim(self, hp: HParams) -> int:
        return hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]

    def extra_tensors(self, hp: HParams) -> list[tuple[gguf.MODEL_TENSOR, np.ndarray]]:
        import gguf

        rope = hp["rope_parameters"]
        if str(rope.get("rope_type", "")).lower() == "llama3":
            return [(gguf.MODEL_TENSOR.ROPE_FREQS, llama3_rope_factors(rope, self.head_dim(hp)))]
        return []

    def write_hparams(self, writer: gguf.GGUFWriter, hp: HParams, file_type: gguf.LlamaFileType) -> None:
        write_text_model_keys(writer, hp, self.block_count(hp), file_type)
        writer.add_vocab_size(hp["vocab_size"])
        writer.add_rope_dimension_count(self.head_dim(hp))
        if fot := {k: hp[k] for k in FOT_FIELDS if k in hp}:
            add_config_fields(writer, FOT_PREFIX, fot)

    def adjust_vocab_keys(self, writer: gguf.GGUFWriter, hp: HParams) -> None:
        # llama.cpp turns BOS off for every llama model with a 49,152-token vocabulary
        # (aimed at Granite small models; SmolLM2 is one too).
        import gguf

        if hp["vocab_size"] == 49152:
            existing = writer.kv_data[0].get(gguf.Keys.Tokenizer.ADD_BOS)
            if existing is not None:
                existing.value = False  # overwrite in place: the key keeps its position
            else:
                writer.add_add_bos_token(False)


def write_text_model_keys(writer: gguf.GGUFWriter, hp: HParams, block_count: int, file_type: gguf.LlamaFileType) -> None:
    """The hyper-parameter keys llama.cpp's converter writes for every text model (its ``TextModel``), in its order."""
    writer.add_block_count(block_count)
    if (n_ctx := _first(hp, CONTEXT_KEYS)) is not None:
        writer.add_context_length(n_ctx)
    writer.add_embedding_length(hp["hidden_size"])
    if (n_ff := _first(hp, FFN_KEYS)) is not None:
        writer.add_feed_forward_length(n_ff)
    writer.add_head_count(hp["num_attention_heads"])
    if hp.get("num_key_value_heads") is not None:
        writer.add_head_count_kv(hp["num_key_value_heads"])
    if hp.get("is_causal") is False:
        writer.add_causal_attention(False)
    write_rope_keys(writer, hp["rope_parameters"])
    if (eps := _first(hp, ("rms_norm_eps", "norm_eps"))) is not None:
        writer.add_layer_norm_rms_eps(eps)
    if (eps := _first(hp, ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"))) is not None:
        writer.add_layer_norm_eps(eps)
    if hp.get("head_dim") is not None:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    writer.add_file_type(file_type)


def _rope_none(writer: gguf.GGUFWriter, rope: dict[str, Any]) -> None:
    """Nothing to write: no scaling, ``dynamic`` (no runtime support) or ``llama3`` (a tensor)."""


def _rope_linear(writer: gguf.GGUFWriter, rope: dict[str, Any]) -> None:
    import gguf

    if rope.get("factor") is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])


def _rope_yarn(writer: gguf.GGUFWriter, rope: dict[str, Any]) -> None:
    import gguf

    if rope.get("factor") is None:
        return
    if float(rope["factor"]) == 1.0:
        # YaRN without interpolation (NTK-YaRN, as quantmill bakes it): unscaled RoPE whose
        # cos/sin are multiplied by attention_factor; llama.cpp reads that as rope.scaling.attn_factor
        # for every architecture (the yarn_attn_factor key only for a few).
        writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)
        if (attn := rope.get("attention_factor")) is not None:
            writer.add_rope_scaling_attn_factors(attn)
        return
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(rope["factor"])
    writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    optional = (
        ("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor),
        ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
        ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
        ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
    )
    for key, add in optional:
        value = rope.get(key, rope.get("attn_factor")) if key == "attention_factor" else rope.get(key)
        if value is not None:
            add(value)


def _rope_longrope(writer: gguf.GGUFWriter, rope: dict[str, Any]) -> None:
    import gguf

    writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)


def check_rope_type(rope: dict[str, Any], config_path: Path) -> None:
    check_rope(rope, config_path)
    rope_type = rope.get("rope_type")
    if rope_type is not None and str(rope_type).lower() not in ROPE_WRITERS:
        raise UnsupportedError(
            f"{config_path}: RoPE type {rope_type!r} is not supported; supported: {', '.join(sorted(ROPE_WRITERS))}"
        )


def write_rope_keys(writer: gguf.GGUFWriter, rope: dict[str, Any]) -> None:
    """The ``rope.scaling.*`` keys of the method, then ``rope.freq_base`` (llama.cpp's key order)."""
    if (rope_type := rope.get("rope_type")) is not None:
        ROPE_WRITERS[str(rope_type).lower()](writer, rope)
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(rope["rope_theta"])


ROPE_WRITERS = {
    "default": _rope_none,
    "dynamic": _rope_none,
    "llama3": _rope_none,
    "linear": _rope_linear,
    "yarn": _rope_yarn,
    "su": _rope_longrope,
    "longrope": _rope_longrope,
}
