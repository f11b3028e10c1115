"""LCKV checkpoints (``model_type: lckv-llama``) run by quantmill's own reference forward in torch.

No runtime implements LCKV and transformers has no class for it (the checkpoints ship custom
code, never run here), so both the float checkpoint and its GPTQ branches (dequantized to
float32, as the GPTQ backend does) are evaluated with :class:`quantmill.convert.lckv.model.LckvForCausalLM`:
sequential semantics, exact. Everything after the logits is the torch backend's.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from quantmill.verify.backends.hf_torch import TorchBackend, float_type_name, safetensors_sizes

FORMAT = "lckv"


def is_lckv_checkpoint(path: Path) -> bool:
    """Cheap detection (reads config.json only): a checkpoint whose architecture record runs on the LCKV forward."""
    from quantmill.convert.arch import for_config
    from quantmill.errors import UserInputError
    from quantmill.jsonio import read_json_object

    config = Path(path) / "config.json"
    if not (Path(path).is_dir() and config.is_file() and any(Path(path).glob("*.safetensors"))):
        return False
    try:
        return for_config(read_json_object(config, "fix config.json"), config).torch_runtime == "lckv"
    except (ValueError, AttributeError, UserInputError):
        return False


class _LogitsOnly:
    """The reference model behind the call shape the torch backend uses (``model(input_ids=…).logits``)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, input_ids: Any, use_cache: bool = False, logits_to_keep: int = 0) -> SimpleNamespace:
        logits = self.model(input_ids)
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)

    def get_output_embeddings(self) -> Any:
        return self.model.lm_head

    def eval(self) -> _LogitsOnly:
        self.model.eval()
        return self

    def to(self, device: str) -> _LogitsOnly:
        self.model.to(device)
        return self


class LckvTorchBackend(TorchBackend):
    """An LCKV checkpoint directory (float, or a GPTQ branch dequantized to float32) on the options' device."""

    format = FORMAT

    def _load(self) -> tuple[Any, int, float, str]:
        from quantmill.convert.lckv.model import LckvForCausalLM
        from quantmill.quantize.gptq.dequant import dequantized_tensors, gptq_size_figures, is_gptq_checkpoint, read_gptq_config

        if is_gptq_checkpoint(self.path):
            size, bpw, _weights = gptq_size_figures(self.path)
            quant_type = f"GPTQ-{read_gptq_config(self.path)['bits']}bit"
            model = LckvForCausalLM.from_tensors(self._config, dequantized_tensors(self.path), self.path)
        else:
            size, bits, elements = safetensors_sizes(self.path)
            bpw = bits / elements if elements else 0.0
            quant_type = float_type_name(self._config, bpw)
            model = LckvForCausalLM.from_checkpoint(self.path)
        return _LogitsOnly(model), size, bpw, quant_type

    def _read_config(self) -> dict[str, Any]:
        """config.json as data; its ``auto_map`` names the LCKV code, which is never imported."""
        from quantmill.quantize.layerwise import read_config

        return read_config(self.path)
