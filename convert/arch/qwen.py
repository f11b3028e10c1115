"""Qwen2 / Qwen2.5 (HF ``Qwen2ForCausalLM``) → GGUF ``qwen2``; Qwen3 (``Qwen3ForCausalLM``) → GGUF ``qwen3``.

Both are llama-shaped decoders (RMS norm, SwiGLU MLP, GQA) with three differences that
matter for conversion:

* RoPE is the NEOX (rotate-half) kind in llama.cpp's qwen graphs, which is HF's own
  layout, so Q/K rows are written as they are (no llama-style pair interleaving);
* Qwen2 has biases on the q/k/v projections (``attn_q.bias`` ... written as F32), Qwen3 none
  but per-head RMS norms on queries and keys (``attn_q_norm`` / ``attn_k_norm``);
* Qwen3's ``head_dim`` is its own field (transformers' default is 128, whatever the hidden
  size), written as ``attention.key_length`` / ``value_length``. llama.cpp's qwen2 graph has
  an ``n_embd × n_embd`` output projection, so a Qwen2 head_dim other than hidden / heads
  is refused.

The keys are what llama.cpp's ``TextModel.set_gguf_parameters`` writes (its Qwen2Model adds
only a sentence-transformers pooling type): the llama keys without ``vocab_size`` and
``rope.dimension_count``. The tokenizer keys differ from llama's too: llama.cpp's Qwen2
vocabulary path does not write ``tokenizer.ggml.add_space_prefix`` and does not turn BOS off
for 49,152-token vocabularies. A tied checkpoint has no ``lm_head.weight`` and so no
``output.weight``: llama.cpp then reuses ``token_embd``.

RoPE: ``linear`` and ``yarn`` (NTK-YaRN with factor 1 as for llama) become ``rope.scaling.*``
keys, ``dynamic`` is dropped (no llama.cpp runtime support); ``llama3`` and ``longrope`` need
per-frequency factor tensors the qwen graphs never read, so they are refused.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantmill.convert.arch.base import Architecture, DecoderSpec, HParams
from quantmill.convert.arch.fields import check_fields
from quantmill.convert.arch.llama import LLAMA_LAYOUT, check_rope_type, rope_parameters_from_config, write_text_model_keys
from quantmill.convert.arch.registry import register
from quantmill.errors import InputFileError, UnsupportedError
from quantmill.jsonio import read_json, read_json_object

if TYPE_CHECKING:
    import gguf

# What transformers' Qwen2Config / Qwen3Config fill in for absent fields (transformers 5).
QWEN2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936,
    "intermediate_size": 22016,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
}
QWEN3_DEFAULTS: dict[str, Any] = {**QWEN2_DEFAULTS, "head_dim": 128}
REQUIRED_INT_FIELDS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
# RoPE types the qwen graphs can run (llama3 / longrope need rope_freqs tensors they do not read).
QWEN_ROPE_TYPES = ("default", "linear", "yarn", "dynamic")
# sentence-transformers pooling (modules.json → <Pooling module>/config.json) as llama.cpp maps it
POOLING_FLAGS = (
    ("pooling_mode_mean_tokens", "MEAN"),
    ("pooling_mode_cls_token", "CLS"),
    ("pooling_mode_lasttoken", "LAST"),
)  # values: gguf.PoolingType member names
POOLING_MODES = {"mean": "MEAN", "cls": "CLS", "lasttoken": "LAST"}
CLASSIFIER_POOLING = {"mean": "MEAN", "cls": "CLS"}
QWEN_STAGES = frozenset({"convert", "statistics", "gptq", "gguf-quantize", "verify-gguf", "verify-torch"})
POOLING_KEY = "quantmill.pooling_type"  # hparams entry (not a config field) carrying the pooling type


def sentence_transformers_pooling(model_dir: Path) -> str | None:
    """The pooling type (a gguf.PoolingType name) of a sentence-transformers directory (modules.json), as llama.cpp reads it."""
    modules_path = model_dir / "modules.json"
    if not modules_path.is_file():
        return None
    modules = read_json(modules_path, "fix or remove the file")
    pooling_dir = next(
        (m.get("path") for m in modules if isinstance(m, dict) and str(m.get("type", "")).endswith("Pooling")), None
    ) if isinstance(modules, list) else None
    if pooling_dir is None:
        return None
    config_path = model_dir / str(pooling_dir) / "config.json"
    pooling = read_json_object(config_path, "fix the pooling module's config.json")
    for flag, kind in POOLING_FLAGS:
        if pooling.get(flag):
            return kind
    if pooling.get("pooling_mode") in POOLING_MODES:
        return POOLING_MODES[pooling["pooling_mode"]]
    raise UnsupportedError(f"{config_path}: pooling {pooling.get('pooling_mode')!r} is not supported; supported: mean, cls, lasttoken")


def _qwen2_classes() -> tuple[Any, Any, Any]:
    from transformers.models.qwen2 import modeling_qwen2

    return modeling_qwen2.Qwen2Config, modeling_qwen2.Qwen2DecoderLayer, modeling_qwen2.Qwen2RotaryEmbedding


def _qwen3_classes() -> tuple[Any, Any, Any]:
    from transformers.models.qwen3 import modeling_qwen3

    return modeling_qwen3.Qwen3Config, modeling_qwen3.Qwen3DecoderLayer, modeling_qwen3.Qwen3RotaryEmbedding


@register("Qwen2ForCausalLM", model_types=("qwen2",))
class Qwen2Architecture(Architecture):
    """Qwen2 / Qwen2.5 (dense): llama-shaped, NEOX RoPE, biases on q/k/v."""

    name = "qwen2"
    stages = QWEN_STAGES
    gguf_name = "qwen2"
    # the llama layer's module names and walk (Qwen2's q/k/v biases stay float in GPTQ checkpoints)
    decoder = DecoderSpec(_qwen2_classes, LLAMA_LAYOUT.groups, flow="pre-norm", pre_norm=LLAMA_LAYOUT)
    defaults: dict[str, Any] = QWEN2_DEFAULTS

    def read_hparams(self, config: dict[str, Any], config_path: Path) -> HParams:
        hp: HParams = {**self.defaults, **config}
        check_fields(hp, config_path, REQUIRED_INT_FIELDS)
        n_head = hp["num_attention_heads"]
        if hp.get("num_key_value_heads") is None:
            hp["num_key_value_heads"] = n_head
        n_kv = hp["num_key_value_heads"]
        if not isinstance(n_kv, int) or isinstance(n_kv, bool) or n_kv <= 0:
            raise InputFileError(config_path, f"field 'num_key_value_heads' is {n_kv!r}, expected a positive integer", "fix config.json")
        if n_head % n_kv:
            raise InputFileError(config_path, f"num_attention_heads {n_head} is not a multiple of num_key_value_heads {n_kv}", "fix config.json")
        self.check_head_dim(hp, config_path)
        hp["rope_parameters"] = rope_parameters_from_config(config, known_to_transformers=True)
        check_rope_type(hp["rope_parameters"], config_path)
        rope_type = str(hp["rope_parameters"].get("rope_type", "default")).lower()
        if rope_type not in QWEN_ROPE_TYPES:
            raise UnsupportedError(
                f"{config_path}: RoPE type {rope_type!r} is not supported for {self.gguf_name} (llama.cpp's graph has no"
                f" RoPE factor tensors); supported: {', '.join(QWEN_ROPE_TYPES)}"
            )
        hp[POOLING_KEY] = sentence_transformers_pooling(config_path.parent)
        classifier = hp.get("classifier_pooling")
        if classifier is not None and classifier not in CLASSIFIER_POOLING:
            raise UnsupportedError(f"{config_path}: classifier_pooling {classifier!r} is not supported; supported: cls, mean")
        return hp

    def check_head_dim(self, hp: HParams, config_path: Path) -> None:
        hidden, n_head = hp["hidden_size"], hp["num_attention_heads"]
        if hidden % n_head:
            raise InputFileError(config_path, f"hidden_size {hidden} is not a multiple of num_attention_heads {n_head}", "fix config.json")
        head_dim = hp.get("head_dim")
        if head_dim is not None and head_dim * n_head != hidden:
            raise UnsupportedError(
                f"{config_path}: head_dim {head_dim} × {n_head} heads ≠ hidden_size {hidden}; llama.cpp's {self.gguf_name}"
                " graph needs heads × head_dim = hidden_size"
            )

    def write_hparams(self, writer: gguf.GGUFWriter, hp: HParams, file_type: gguf.LlamaFileType) -> None:
        import gguf

        write_text_model_keys(writer, hp, self.block_count(hp), file_type)
        if hp.get(POOLING_KEY) is not None:
            writer.add_pooling_type(gguf.PoolingType[hp[POOLING_KEY]])
        if (classifier := hp.get("classifier_pooling")) is not None:
            pooling = gguf.PoolingType[CLASSIFIER_POOLING[classifier]]
            writer.add_uint32(f"{writer.arch}.classifier.pooling_type", pooling.value)  # gguf 0.19 has no adder

    def adjust_vocab_keys(self, writer: gguf.GGUFWriter, hp: HParams) -> None:
        # llama.cpp's Qwen2 vocabulary (SentencePiece, else GPT-2 BPE) never writes the
        # tokenizer_config.json add_prefix_space flag that its llama path writes.
        import gguf

        writer.kv_data[0].pop(gguf.Keys.Tokenizer.ADD_PREFIX, None)


@register("Qwen3ForCausalLM", model_types=("qwen3",))
class Qwen3Architecture(Qwen2Architecture):
    """Qwen3 (dense): Qwen2 without q/k/v biases, with q/k RMS norms and its own head_dim."""

    name = "qwen3"
    gguf_name = "qwen3"
    decoder = DecoderSpec(_qwen3_classes, LLAMA_LAYOUT.groups, flow="pre-norm", pre_norm=LLAMA_LAYOUT)
    defaults = QWEN3_DEFAULTS

    def check_head_dim(self, hp: HParams, config_path: Path) -> None:
        head_dim = hp.get("head_dim")
        if head_dim is not None and (not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim <= 0 or head_dim % 2):
            raise InputFileError(config_path, f"field 'head_dim' is {head_dim!r}, expected a positive even integer", "fix config.json")
        if head_dim is None and hp["hidden_size"] % hp["num_attention_heads"]:
            raise InputFileError(
                config_path, f"hidden_size {hp['hidden_size']} is not a multiple of num_attention_heads {hp['num_attention_heads']}",
                "fix config.json or set head_dim",
            )

    def check_checkpoint(self, hp: HParams, tensor_names: set[str], model_dir: Path) -> None:
        for i in range(self.block_count(hp)):
            for norm in ("q_norm", "k_norm"):
                name = f"model.layers.{i}.self_attn.{norm}.weight"
                if name not in tensor_names:
                    raise InputFileError(model_dir, f"has no tensor {name!r}, which every Qwen3 layer needs", "check that every shard is present")
