"""Hugging Face checkpoints in torch: fp32 compute on CPU, several chunks per forward pass.

Only the logits from the first scored position on are computed (``logits_to_keep``), and
only safetensors weights are loaded; remote code is never run.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from quantmill.convert.safetensors_io import tensor_entries
from quantmill.errors import InputFileError
from quantmill.jsonio import read_json_object
from quantmill.verify.backends.base import (
    ArtifactInfo,
    BackendOptions,
    ChunkLogProbs,
    LogProbBackend,
)
from quantmill.verify.tokens import ChunkPlan


def safetensors_sizes(directory: Path) -> tuple[int, int, int]:
    """(bytes on disk of all *.safetensors, tensor-data bits, element count) from the headers only."""
    files = sorted(directory.glob("*.safetensors"))
    entries = tensor_entries(files)
    return sum(p.stat().st_size for p in files), sum(8 * e.nbytes for e in entries), sum(e.n_elements for e in entries)


def _load_model(path: Path, config: dict[str, Any]) -> Any:
    """The checkpoint as an fp32 causal LM of its family's transformers class, without the loading progress bar.

    The config comes from the architecture record (LongLLaMA as llama, RefinedWeb as Falcon), as data.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from quantmill.convert.arch.hf_config import transformers_config

    hf_config = transformers_config(config, path / "config.json")
    bar_was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, config=hf_config, dtype=torch.float32, use_safetensors=True, trust_remote_code=False,
            local_files_only=True,
        )
    except (OSError, ValueError, KeyError) as exc:
        raise InputFileError(path, f"transformers cannot load it ({exc})", "check the checkpoint") from exc
    finally:
        if bar_was_enabled:
            hf_logging.enable_progress_bar()


def float_type_name(config: dict[str, Any], bpw: float) -> str:
    """F32, F16 or BF16: config.json's dtype where it says, else from the bits per weight."""
    declared = str(config.get("dtype", config.get("torch_dtype", ""))).lower()
    names = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
    return names.get(declared, "F32" if bpw > 24 else "F16")


class TorchBackend(LogProbBackend):
    """An HF causal LM loaded in float32 on the options' device."""

    format = "hf"

    def __init__(self, path: Path, options: BackendOptions) -> None:
        import torch

        self.path = Path(path)
        self.options = options
        self._torch = torch
        self._config = self._read_config()
        self._model, size, bpw, quant_type = self._load()
        self._model.eval()
        self._model.to(options.device)  # float32 on every device: the CPU and CUDA figures compare
        n_vocab = int(self._model.get_output_embeddings().weight.shape[0])
        self.info = ArtifactInfo(self.path, self.format, size, bpw, n_vocab, quant_type)

    def _load(self) -> tuple[Any, int, float, str]:
        """The model (called as ``model(input_ids=…).logits``), bytes on disk, bits per weight, quant type name."""
        size, bits, elements = safetensors_sizes(self.path)
        bpw = bits / elements if elements else 0.0
        return _load_model(self.path, self._config), size, bpw, float_type_name(self._config, bpw)

    def _read_config(self) -> dict[str, Any]:
        return read_json_object(self.path / "config.json", "re-create the checkpoint")

    def close(self) -> None:
        self._model = None

    def check_vocabulary(self, plan: ChunkPlan, id_to_token: dict[int, str]) -> None:
        """Ids must fit the output layer; if the checkpoint has its own tokenizer.json, its token texts must agree."""
        tokenizer_path = self.path / "tokenizer.json"
        texts = None
        if tokenizer_path.is_file():
            from tokenizers import Tokenizer

            texts = (tokenizer_path, Tokenizer.from_file(str(tokenizer_path)).id_to_token)
        self._check_token_ids(plan, id_to_token, "output layer has {} rows", texts)

    def iter_logprobs(self, plan: ChunkPlan) -> Iterator[ChunkLogProbs]:
        torch = self._torch
        keep = plan.n_ctx - plan.first  # positions first … n_ctx-1; the last one is dropped
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(self.options.n_threads)
        try:
            for group in plan.groups(self.options.chunks_for(plan.n_ctx)):
                ids = torch.from_numpy(np.stack([plan.chunk_input(i) for i in group]).astype(np.int64)).to(self.options.device)
                with torch.inference_mode():
                    logits = self._model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
                    logprobs = torch.log_softmax(logits[:, :-1, :].float(), dim=-1).cpu()
                for row, index in enumerate(group):
                    yield ChunkLogProbs(index, logprobs[row].numpy(), plan.chunk_targets(index))
        finally:
            torch.set_num_threads(previous_threads)
