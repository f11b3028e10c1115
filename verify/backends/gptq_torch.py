"""GPTQ v1 checkpoints in torch: dequantized on load to a plain float32 model, then run as any HF model.

No GPTQ kernel is involved: every packed linear becomes the float32 weight a v1 loader
reconstructs (:mod:`quantmill.quantize.gptq.dequant`), so the figures measure the quantized
weights themselves, with exactly the same forward code as the fp16 reference.
"""
from __future__ import annotations

from pathlib import Path

from quantmill.verify.backends.base import ArtifactInfo, BackendOptions
from quantmill.verify.backends.hf_torch import TorchBackend

FORMAT = "gptq"


def is_gptq_checkpoint(path: Path) -> bool:
    """Cheap detection (reads config.json only), for the backend registry."""
    from quantmill.quantize.gptq.dequant import is_gptq_checkpoint as detect

    return detect(path) and any(Path(path).glob("*.safetensors"))


class GptqTorchBackend(TorchBackend):
    """A GPTQ branch directory, dequantized to float32 on the CPU."""

    def __init__(self, path: Path, options: BackendOptions) -> None:
        import torch

        from quantmill.quantize.gptq.dequant import gptq_size_figures, load_dequantized_model, read_gptq_config

        self.path = Path(path)
        self.options = options
        self._torch = torch
        self._config = self._read_config()
        qconfig = read_gptq_config(self.path)
        size, bpw, _weights = gptq_size_figures(self.path)
        self._model = load_dequantized_model(self.path)
        n_vocab = int(self._model.get_output_embeddings().weight.shape[0])
        self.info = ArtifactInfo(self.path, FORMAT, size, bpw, n_vocab, f"GPTQ-{qconfig['bits']}bit")
