"""GPTQ v1 checkpoints in torch: dequantized on load to a plain float32 model, then run as any HF model.

No GPTQ kernel is involved: every packed linear becomes the float32 weight a v1 loader
reconstructs (:mod:`quantmill.quantize.gptq.dequant`), so the figures measure the quantized
weights themselves, with exactly the same forward code as the fp16 reference.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from quantmill.verify.backends.hf_torch import TorchBackend

FORMAT = "gptq"


def is_gptq_checkpoint(path: Path) -> bool:
    """Cheap detection (reads config.json only), for the backend registry."""
    from quantmill.quantize.gptq.dequant import is_gptq_checkpoint as detect

    return detect(path) and any(Path(path).glob("*.safetensors"))


class GptqTorchBackend(TorchBackend):
    """A GPTQ branch directory, dequantized to float32 (then moved to the options' device)."""

    format = FORMAT

    def _load(self) -> tuple[Any, int, float, str]:
        from quantmill.quantize.gptq.dequant import gptq_size_figures, load_dequantized_model, read_gptq_config

        size, bpw, _weights = gptq_size_figures(self.path)
        return load_dequantized_model(self.path), size, bpw, f"GPTQ-{read_gptq_config(self.path)['bits']}bit"
