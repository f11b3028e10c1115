"""Data-free calibration: the model writes its own calibration text from seeded prompts.

``--calib generated``: each sequence starts from one token drawn (seeded numpy PCG64)
uniformly from the non-special vocabulary; the model then samples the remaining
``seqlen - 1`` tokens itself (top-k, temperature) with a seeded torch generator, as in
LLM-QAT's data-free distillation. The ids are hashed like any other calibration set.

This loads the whole model (transformers' ``AutoModelForCausalLM``, safetensors only, no
remote code): it is an explicit user choice, meant for models small enough for that.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from quantmill.calib_data.sampling import TOKENIZER_FILE, CalibrationSet, check_sizes, token_sha256
from quantmill.jsonio import read_json_object

if TYPE_CHECKING:
    import torch

GENERATED_SPEC = "generated"
DEFAULT_TOP_K = 50
DEFAULT_TEMPERATURE = 1.0


def special_token_ids(model_dir: Path) -> set[int]:
    """Ids of the tokenizer's special (added) tokens, never used as prompts."""
    data = read_json_object(Path(model_dir) / TOKENIZER_FILE, "save the model with its fast tokenizer")
    return {int(t["id"]) for t in data.get("added_tokens", []) if t.get("special")}


def _next_tokens(logits: torch.Tensor, top_k: int, temperature: float, generator: torch.Generator) -> torch.Tensor:
    import torch

    values, indices = torch.topk(logits.float() / temperature, k=min(top_k, logits.shape[-1]), dim=-1)
    probs = torch.softmax(values, dim=-1)
    choice = torch.multinomial(probs.cpu(), num_samples=1, generator=generator).to(indices.device)
    return indices.gather(-1, choice)


def generate_sequences(
    model_dir: Path,
    samples: int,
    seqlen: int,
    seed: int,
    *,
    top_k: int = DEFAULT_TOP_K,
    temperature: float = DEFAULT_TEMPERATURE,
    batch_size: int = 8,
    device: str = "cpu",
    progress: bool = True,
) -> CalibrationSet:
    """``samples`` sequences of ``seqlen`` tokens sampled from the model itself, seeded."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    check_sizes(samples, seqlen)
    model_dir = Path(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True).to(device).eval()  # type: ignore[arg-type]
    vocab = int(model.config.vocab_size)
    special = special_token_ids(model_dir)
    candidates = np.array([i for i in range(vocab) if i not in special], dtype=np.int64)
    prompts = np.random.Generator(np.random.PCG64(seed)).choice(candidates, size=samples)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = np.empty((samples, seqlen), dtype=np.int32)
    bar = tqdm(total=samples * (seqlen - 1), desc="generating", unit="tok", disable=not progress, leave=False)
    with torch.inference_mode():
        for start in range(0, samples, batch_size):
            current = torch.from_numpy(prompts[start : start + batch_size]).to(device)[:, None]
            tokens = [current]
            cache = None
            for _ in range(seqlen - 1):
                result = model(input_ids=current, past_key_values=cache, use_cache=True)
                cache = result.past_key_values
                current = _next_tokens(result.logits[:, -1, :], top_k, temperature, generator)
                tokens.append(current)
                bar.update(current.shape[0])
            out[start : start + current.shape[0]] = torch.cat(tokens, dim=1).cpu().numpy()
    bar.close()
    source = f"{GENERATED_SPEC}(top_k={top_k},temperature={temperature:g})"
    return CalibrationSet(out, source, seed, token_sha256(out), corpus_tokens=int(out.size))
