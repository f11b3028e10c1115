"""Falcon: HF ``FalconForCausalLM`` (7B-style and 40B-style) and old RefinedWeb checkpoints → GGUF ``falcon``.

7B-style: ``multi_query`` (one KV head), ``parallel_attn``, one layer norm per block
(``input_layernorm``). 40B-style: ``new_decoder_architecture``, ``num_kv_heads`` KV groups,
two layer norms (``ln_attn`` before attention, ``ln_mlp`` before the MLP). llama.cpp's
falcon graph feeds ``attn_norm`` to the MLP and ``attn_norm_2`` (when present) to attention,
so gguf-py maps ``ln_mlp`` → ``attn_norm`` and ``ln_attn`` → ``attn_norm_2``.

The fused ``query_key_value`` rows are stored per KV group: the group's query heads, then
its key head, then its value head. llama.cpp wants all query heads, then all key heads,
then all value heads; that is a row permutation (``tensor_data_layout = jploski``). The KV
head count is the one transformers uses: ``num_kv_heads`` for the new decoder or without
multi-query, else 1 (a 7B-style config saved by transformers 5 says ``num_kv_heads =
num_attention_heads`` next to ``multi_query: true``; taking it literally breaks the model).

Unlike llama.cpp's converter this writes the real ``context_length`` (not 2048) and the
RoPE keys (base, scaling) exactly as for llama, so a baked RoPE (NTK-YaRN included)
reaches the GGUF. llama.cpp's falcon graph passes ``rope.scaling.attn_factor`` to its
rotation like every architecture, so NTK-YaRN's q/k scaling needs no weight folding.

RefinedWeb configs (``model_type`` ``RefinedWeb`` = 40B-style, ``RefinedWebModel`` =
7B-style; ``n_head``, ``n_head_kv``, ``n_layer``, ``n_embed``) are translated as data by
:func:`falcon_config` into the fields transformers' FalconConfig uses; their ``auto_map``
code is never run. ``ntk_scaling_factor`` s becomes NTK-YaRN RoPE (the method
``quantmill bake --rope ntk-yarn`` writes) over the 2048-token original context.
ALiBi, sequential (non-parallel) attention and linear biases have no llama.cpp support
in the falcon graph and are refused.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantmill.convert.arch.base import Architecture, DecoderSpec, HParams
from quantmill.convert.arch.fields import check_fields
from quantmill.convert.arch.llama import check_rope_type, rope_parameters_from_config, write_rope_keys
from quantmill.convert.arch.registry import register
from quantmill.errors import InputFileError, UnsupportedError

if TYPE_CHECKING:
    import gguf
    import numpy as np

# What transformers' FalconConfig fills in for absent fields (transformers 5).
FALCON_DEFAULTS: dict[str, Any] = {
    "vocab_size": 65024,
    "layer_norm_epsilon": 1e-5,
    "alibi": False,
    "new_decoder_architecture": False,
    "multi_query": True,
    "parallel_attn": True,
    "bias": False,
    "max_position_embeddings": 2048,
    "activation": "gelu",
    "num_ln_in_parallel_attn": None,
}
REFINEDWEB_RENAMES = {"n_head": "num_attention_heads", "n_head_kv": "num_kv_heads", "n_layer": "num_hidden_layers", "n_embed": "hidden_size"}
# model_type -> new_decoder_architecture
REFINEDWEB_TYPES = {"RefinedWeb": True, "RefinedWebModel": False}
REFINEDWEB_DEFAULT_KV_HEADS = 1  # RWConfig's n_head_kv default (llama.cpp's converter agrees)
REFINEDWEB_CONTEXT = 2048  # RefinedWeb configs carry no context length; Falcon was trained on 2048 tokens
REQUIRED_INT_FIELDS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
# (field, value llama.cpp's falcon graph needs, what to say)
UNSUPPORTED_SETTINGS = (
    ("alibi", False, "ALiBi positions (llama.cpp's falcon graph uses RoPE)"),
    ("bias", False, "biases on the linear layers (llama.cpp's falcon graph has none)"),
    ("activation", "gelu", "an activation other than gelu"),
)


def refinedweb_to_falcon(config: dict[str, Any], config_path: Path) -> dict[str, Any]:
    """A RefinedWeb config.json as a transformers Falcon one (renamed fields, no ``auto_map``), as data."""
    from quantmill.convert.rope import RopeBase, bake_rope_config

    out = {REFINEDWEB_RENAMES.get(k, k): v for k, v in config.items() if k not in ("auto_map", "ntk_scaling_factor")}
    out["model_type"] = "falcon"
    out["architectures"] = ["FalconForCausalLM"]
    out["new_decoder_architecture"] = REFINEDWEB_TYPES[str(config["model_type"])]
    out.setdefault("num_kv_heads", REFINEDWEB_DEFAULT_KV_HEADS)
    out.setdefault("max_position_embeddings", REFINEDWEB_CONTEXT)
    factor = config.get("ntk_scaling_factor")
    if factor is not None and factor != 1:
        heads, hidden = out.get("num_attention_heads"), out.get("hidden_size")
        if not isinstance(heads, int) or not isinstance(hidden, int) or heads <= 0:
            raise InputFileError(config_path, "n_head / hidden_size missing or not integers", "fix config.json")
        base = RopeBase(float(out.get("rope_theta", 10000.0)), hidden // heads, float(factor), int(out["max_position_embeddings"]))
        bake = bake_rope_config("ntk-yarn", base)
        out.update(bake.config_updates())
    return out


def falcon_config(config: dict[str, Any], config_path: Path) -> dict[str, Any]:
    """config.json as transformers' FalconConfig fields (RefinedWeb configs translated), defaults filled in."""
    check_fields(config, config_path)
    if config.get("model_type") in REFINEDWEB_TYPES:
        config = refinedweb_to_falcon(config, config_path)
    hp: HParams = {**FALCON_DEFAULTS, **config}
    check_fields(hp, config_path, REQUIRED_INT_FIELDS)
    if hp.get("num_kv_heads") is None:
        hp["num_kv_heads"] = hp["num_attention_heads"]
    if hp.get("ffn_hidden_size") is None:
        hp["ffn_hidden_size"] = 4 * hp["hidden_size"]
    if hp["num_ln_in_parallel_attn"] is None and hp["new_decoder_architecture"]:
        hp["num_ln_in_parallel_attn"] = 2
    return hp


def kv_heads(hp: HParams) -> int:
    """The KV head count transformers' Falcon attention actually uses."""
    return int(hp["num_kv_heads"]) if hp["new_decoder_architecture"] or not hp["multi_query"] else 1


def qkv_row_order(n_head: int, n_kv: int, head_dim: int) -> np.ndarray:
    """Rows of the fused QKV regrouped from per-KV-group (q…q k v) to all q, all k, all v."""
    import numpy as np

    groups = np.arange(n_head * head_dim + 2 * n_kv * head_dim).reshape(n_kv, n_head // n_kv + 2, head_dim)
    return np.concatenate([groups[:, :-2].reshape(-1), groups[:, -2].reshape(-1), groups[:, -1].reshape(-1)])


def _reorder_qkv(hp: HParams, shape: tuple[int, ...]) -> np.ndarray:
    n_head = hp["num_attention_heads"]
    return qkv_row_order(n_head, kv_heads(hp), hp["hidden_size"] // n_head)


def _falcon_classes() -> tuple[Any, Any, Any]:
    from transformers.models.falcon import modeling_falcon

    return modeling_falcon.FalconConfig, modeling_falcon.FalconDecoderLayer, modeling_falcon.FalconRotaryEmbedding


# Falcon's layer is parallel: out = h + attn(norm_a(h)) + mlp(norm_m(h)) (7B: one norm for both;
# 40B: ln_attn and ln_mlp). The four linears are four true-sequential groups, as GPTQModel's
# RefinedWeb definition has them; the generic flow walks them with forward hooks.
FALCON_GROUPS = (
    ("self_attention.query_key_value",), ("self_attention.dense",), ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",),
)
FALCON_DECODER = DecoderSpec(
    _falcon_classes, FALCON_GROUPS, flow="generic", embed_weight="transformer.word_embeddings.weight",
    layer_prefix="transformer.h.{index}.", layer_kwargs={"alibi": None, "attention_mask": None},
)


@register("FalconForCausalLM", "RWForCausalLM", model_types=("falcon", *REFINEDWEB_TYPES))
class FalconArchitecture(Architecture):
    """Falcon 7B-style (multi-query), 40B-style (new decoder architecture) and RefinedWeb configs."""

    name = "falcon"
    stages = frozenset({"convert", "merge", "bake", "statistics", "gptq", "gguf-quantize", "verify-gguf", "verify-torch"})
    gguf_name = "falcon"
    row_transforms = {"ATTN_QKV": _reorder_qkv}
    vocab_kinds = ("bpe",)
    decoder = FALCON_DECODER

    def transformers_config(self, config: Mapping[str, Any], config_path: Path) -> dict[str, Any]:
        """RefinedWeb configs as transformers' Falcon fields (their ``auto_map`` code is never run)."""
        if config.get("model_type") in REFINEDWEB_TYPES:
            return refinedweb_to_falcon(dict(config), config_path)
        return dict(config)

    def read_hparams(self, config: dict[str, Any], config_path: Path) -> HParams:
        hp = falcon_config(config, config_path)
        for key, wanted, what in UNSUPPORTED_SETTINGS:
            if hp.get(key) != wanted:
                raise UnsupportedError(f"{config_path}: {key} = {hp.get(key)!r}: {what} is not supported for GGUF")
        if not hp["new_decoder_architecture"] and not hp["parallel_attn"]:
            raise UnsupportedError(f"{config_path}: parallel_attn = false is not supported for GGUF (llama.cpp's falcon graph is parallel)")
        n_head, n_kv = hp["num_attention_heads"], kv_heads(hp)
        if hp["hidden_size"] % n_head or n_head % n_kv:
            raise InputFileError(config_path, f"hidden_size {hp['hidden_size']}, {n_head} heads and {n_kv} KV heads do not divide", "fix config.json")
        hp["rope_parameters"] = rope_parameters_from_config(hp, known_to_transformers=True)
        check_rope_type(hp["rope_parameters"], config_path)
        return hp

    def write_hparams(self, writer: gguf.GGUFWriter, hp: HParams, file_type: gguf.LlamaFileType) -> None:
        writer.add_context_length(hp["max_position_embeddings"])
        writer.add_tensor_data_layout("jploski")  # the QKV row order above
        writer.add_embedding_length(hp["hidden_size"])
        writer.add_feed_forward_length(hp["ffn_hidden_size"])
        writer.add_block_count(self.block_count(hp))
        writer.add_head_count(hp["num_attention_heads"])
        writer.add_head_count_kv(kv_heads(hp))
        writer.add_layer_norm_eps(hp["layer_norm_epsilon"])
        write_rope_keys(writer, hp["rope_parameters"])
        writer.add_rope_dimension_count(hp["hidden_size"] // hp["num_attention_heads"])
        writer.add_file_type(file_type)
