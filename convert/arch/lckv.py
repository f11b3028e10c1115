"""LCKV llama (``model_type: lckv-llama``) → GGUF: llama keys and tensors plus the documented ``lckv.*`` keys.

The layers that compute no KV have no ``attn_k``/``attn_v`` tensors, so no runtime loads the
file as a plain llama (none implements LCKV); the GGUF carries the weights and the whole
LCKV layout (see :mod:`quantmill.convert.lckv.config` for the keys) for tools that do.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantmill.convert.arch.base import DecoderSpec, HParams
from quantmill.convert.arch.extra_keys import add_value
from quantmill.convert.arch.llama import LlamaArchitecture
from quantmill.convert.arch.registry import register
from quantmill.convert.lckv.config import MODEL_TYPE, check_kv_tensors, parse_lckv

if TYPE_CHECKING:
    import gguf


def _lckv_classes() -> tuple[Any, Any, Any]:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from quantmill.convert.lckv.model import LckvDecoderLayer, LckvLlamaConfig

    return LckvLlamaConfig, LckvDecoderLayer, LlamaRotaryEmbedding


@register("LCKVLlamaForCausalLM", model_types=(MODEL_TYPE,))
class LckvLlamaArchitecture(LlamaArchitecture):
    """LCKV: layers that compute no KV attend to another layer's (quantmill's own reference forward).

    No runtime runs LCKV: the GGUF carries the weights and the layout, but libllama cannot quantize
    or run it, and verify runs the float and GPTQ checkpoints on quantmill's reference forward.
    k/v are not in the linear groups: the LCKV flow quantizes them with q where a layer has them.
    """

    name = MODEL_TYPE
    stages = frozenset({"convert", "merge", "bake", "gptq", "verify-torch"})  # no plain layer pass: a layer needs another's KV
    decoder = DecoderSpec(
        _lckv_classes,
        (("self_attn.q_proj",), ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
        flow="lckv",
    )
    gguf_to_hf = None
    gguf_key_prefix = "lckv."
    torch_runtime = "lckv"

    def read_hparams(self, config: dict[str, Any], config_path: Path) -> HParams:
        spec = parse_lckv(config, config_path)
        hp = super().read_hparams(config, config_path)
        hp["lckv"] = spec
        return hp

    def check_checkpoint(self, hparams: HParams, tensor_names: set[str], model_dir: Path) -> None:
        check_kv_tensors(hparams["lckv"], tensor_names, model_dir)

    def write_hparams(self, writer: gguf.GGUFWriter, hp: HParams, file_type: gguf.LlamaFileType) -> None:
        super().write_hparams(writer, hp, file_type)
        for key, value in hp["lckv"].gguf_keys().items():
            add_value(writer, key, value, unsigned=True)
