"""How much of the output distribution each tensor's quantization costs: measured one tensor at a time.

    gains = measure_gains(reference_dir, source_gguf, means, probes, token_ids)   # probes: (tensor, probe type)

For every tensor of a mix, the float model's weight is replaced by its quantization at a probe type
(:data:`PROBE_TYPES`: the first its rows fit) (libggml's quantizer with the imatrix,
the same blocks libllama writes; a GGUF row is a row of the Hugging Face weight, so llama.cpp's
Q/K row order does not change them), the mean KL divergence of the model's next-token
distributions to the float model's is measured on ``token_ids``, and the weight is put back.
A tensor's gain is that KLD divided by its imatrix-weighted error at the probe type: to second
order the KLD grows with the squared change of the tensor's outputs, which the error measures,
so ``gain × error(type)`` predicts the tensor's share of a mix's KLD at any type, and the sum over
tensors the mix's (independent quantization errors do not interfere, to that order).

Each probe runs the model from the decoder layer that holds the tensor: the float hidden
states at every layer's input are kept from one reference pass (layers × tokens × hidden
floats). The embedding (and a tied output head) runs whole.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantmill.errors import UnsupportedError

if TYPE_CHECKING:
    import numpy as np
    import torch

LOG = logging.getLogger("quantmill.gguf.mix")
# (sequences, tokens) of calibration text the gains are measured on: 512 tokens, one model run per tensor
DEFAULT_REFINE_TOKENS = (2, 256)
PROBE_TYPES = ("Q3_K", "Q4_0")  # the first whose blocks a tensor's rows fit is its probe type
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def probe_type(candidates: Sequence[str]) -> str:
    """The probe type of a tensor whose rows fit ``candidates`` (smallest first)."""
    return next((name for name in PROBE_TYPES if name in candidates), candidates[0])


class _Model:
    """The float model, run from any decoder layer on kept hidden states."""

    def __init__(self, model: Any, token_ids: torch.Tensor) -> None:
        import torch

        self.model = model
        self.ids = token_ids
        inner = model.model
        self.layers = inner.layers
        with torch.inference_mode():
            hidden = inner.embed_tokens(token_ids)
            positions = torch.arange(token_ids.shape[1])[None].expand(token_ids.shape[0], -1)
            self.position_embeddings = inner.rotary_emb(hidden, positions)
            self.mask: torch.Tensor | None = None
            self.inputs: list[torch.Tensor] = []
            for layer in self.layers:
                self.inputs.append(hidden)
                hidden = self._layer(layer, hidden)
            self.reference = torch.log_softmax(model.lm_head(inner.norm(hidden)).float(), dim=-1)

    def _layer(self, layer: Any, hidden: torch.Tensor) -> torch.Tensor:
        out = layer(hidden, attention_mask=self._causal_mask(hidden), position_embeddings=self.position_embeddings)
        return out[0] if isinstance(out, tuple) else out

    def _causal_mask(self, hidden: torch.Tensor) -> torch.Tensor:
        import torch

        mask = self.mask
        if mask is None:
            n = hidden.shape[1]
            mask = torch.full((n, n), float("-inf"), dtype=hidden.dtype).triu(1)[None, None].expand(hidden.shape[0], 1, n, n)
            self.mask = mask
        return mask

    def kld_from(self, start: int | None) -> float:
        """Mean KL(float ‖ now) over every token, running from layer ``start`` (None: from the embedding)."""
        import torch

        inner = self.model.model
        with torch.inference_mode():
            hidden = inner.embed_tokens(self.ids) if start is None else self.inputs[start]
            for layer in self.layers[start or 0:]:
                hidden = self._layer(layer, hidden)
            logp = torch.log_softmax(self.model.lm_head(inner.norm(hidden)).float(), dim=-1)
            kld = (self.reference.exp() * (self.reference - logp)).sum(-1)
        return float(kld.double().mean())


def measure_gains(reference_dir: Path, source: Path, means: dict[str, np.ndarray], probes: Sequence[tuple[str, str]],
                  token_ids: np.ndarray, *, threads: int = 1, progress: bool = False) -> dict[str, float]:
    """KLD per unit of imatrix-weighted error, per (GGUF tensor name, probe type) of ``probes`` (module docstring)."""
    import numpy as np
    import torch

    from quantmill.convert.gguf_reader import GGUFFile
    from quantmill.convert.gguf_to_hf import hf_names_by_gguf_name
    from quantmill.jsonio import read_json_object
    from quantmill.progress import LayerProgress
    from quantmill.quantize.gguf.inspect import summarize_gguf
    from quantmill.quantize.gguf.tensor_error import dequantize_rows, quantize_rows
    from quantmill.quantize.gguf.types import ggml_type
    from quantmill.verify.backends.hf_torch import _load_model

    summarize_gguf(source).require("gguf-mix-gains")  # the GGUF -> HF name map and a llama-kind decoder
    config = read_json_object(Path(reference_dir) / "config.json", "pass the float checkpoint the GGUF was converted from")
    hf_names = hf_names_by_gguf_name(GGUFFile.open(source), config)
    model = _load_model(Path(reference_dir), config)
    model.eval()
    if not hasattr(model, "model") or not hasattr(model.model, "layers") or not hasattr(model.model, "rotary_emb"):
        raise UnsupportedError(f"{reference_dir}: measuring tensor gains needs a decoder of the llama kind "
                               "(model.layers with rotary embeddings); choose the mix without --refine")
    params = dict(model.named_parameters(remove_duplicate=False))
    runner = _Model(model, torch.from_numpy(np.asarray(token_ids, dtype=np.int64)))
    gains: dict[str, float] = {}
    bar = LayerProgress("mix: measuring gains", len(probes), 0, bars=progress)
    for tensor_name, probe in probes:
        hf_name = hf_names.get(tensor_name)
        if hf_name is None or hf_name not in params:
            raise UnsupportedError(f"{source}: tensor {tensor_name!r} has no weight in {reference_dir}")
        param = params[hf_name]
        original = param.detach().clone()
        weight = original.float().reshape(-1, original.shape[-1]).numpy()
        tensor_type = ggml_type(probe)
        importance = means.get(tensor_name)
        if importance is not None and importance.shape != (weight.shape[1],):
            importance = None
        quantized = dequantize_rows(quantize_rows(weight, tensor_type, importance, threads), tensor_type)
        diff = (quantized - weight).astype(np.float64) ** 2
        error = float(diff.sum(axis=0) @ (importance.astype(np.float64) if importance is not None else np.ones(diff.shape[1])))
        with torch.no_grad():
            param.copy_(torch.from_numpy(quantized).reshape(original.shape).to(param.dtype))
        match = _LAYER.search(hf_name)
        kld = runner.kld_from(int(match.group(1)) if match else None)
        with torch.no_grad():
            param.copy_(original)
        gains[tensor_name] = kld / error if error > 0 else 0.0
        bar.advance(tensor_name)
    bar.close()
    return dict(sorted(gains.items()))


def refinement_tokens(reference_dir: Path, samples: int, seqlen: int, seed: int = 0) -> np.ndarray:
    """``samples`` × ``seqlen`` token ids of the bundled calibration corpus, tokenized by ``reference_dir``'s tokenizer."""
    from quantmill.calib_data.bundled import BUNDLED_SPEC
    from quantmill.calib_data.loaders import load_calibration_text
    from quantmill.calib_data.sampling import load_tokenize, sample_sequences

    text = load_calibration_text(BUNDLED_SPEC)
    return sample_sequences(text, load_tokenize(Path(reference_dir)), samples, seqlen, seed).token_ids
