"""PEFT training and reference merges for the merge / GGUF LoRA tests.

Adapters are trained for a few deterministic steps (fixed seed, fixed token batch, AdamW,
no dropout) so that every factor (A, B, DoRA magnitudes, saved modules) moves away from
its initial value; the reference is PEFT's own ``merge_and_unload``.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

TRAIN_STEPS = 3
LEARNING_RATE = 1e-2


def token_batch(vocab_size: int, seed: int = 0, batch: int = 2, length: int = 16) -> Any:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator)


def load_model(model_dir: Path, **kwargs: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs).eval()


def train_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    seed: int = 0,
    steps: int = TRAIN_STEPS,
    resize_vocab: int | None = None,
    input_ids: Any = None,
    **lora_kwargs: Any,
) -> Path:
    """Train a PEFT LoRA adapter on ``base_dir`` for ``steps`` steps and save it to ``out_dir``."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = load_model(base_dir)
    if resize_vocab is not None:
        model.resize_token_embeddings(resize_vocab, mean_resizing=False)
    lora_kwargs.setdefault("lora_dropout", 0.0)
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    peft_model.train()
    ids = input_ids if input_ids is not None else token_batch(model.config.vocab_size, seed)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    for _ in range(steps):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.save_pretrained(out_dir)
    return out_dir


def untie(model: Any) -> Any:
    """PEFT's advice before merging into a tied model: give lm_head its own copy of the embedding."""
    import torch

    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    return model


def peft_merge(
    base_dir: Path, adapters: Sequence[tuple[Path, float]], *, resize_vocab: int | None = None, untied: bool = False
) -> Any:
    """Merge ``adapters`` in order with PEFT: load each onto the previous merge, scale it, merge_and_unload."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = load_model(base_dir)
    if untied:
        model = untie(model)
    if resize_vocab is not None:
        model.resize_token_embeddings(resize_vocab, mean_resizing=False)
    for path, weight in adapters:
        peft_model = PeftModel.from_pretrained(model, path)
        if weight != 1.0:
            for module in peft_model.modules():
                if isinstance(module, LoraLayer):
                    module.set_scale("default", weight)
        model = peft_model.merge_and_unload()
    return model.eval()


def peft_logits(base_dir: Path, adapter: Path, ids: Any, *, resize_vocab: int | None = None) -> Any:
    """Logits of the unmerged PEFT model: what the adapter computes."""
    import torch
    from peft import PeftModel

    model = load_model(base_dir)
    if resize_vocab is not None:
        model.resize_token_embeddings(resize_vocab, mean_resizing=False)
    peft_model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        return peft_model(input_ids=ids).logits


def logits(model: Any, ids: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits


def max_state_diff(merged_dir: Path, reference: Any) -> float:
    """Largest |ours - PEFT| over every tensor of the reference model (both loaded by transformers)."""
    ours = load_model(merged_dir).state_dict()
    ref = reference.state_dict()
    assert set(ours) == set(ref), (sorted(set(ours) ^ set(ref)))
    worst = 0.0
    for name, value in ref.items():
        assert ours[name].shape == value.shape, name
        worst = max(worst, float((ours[name].float() - value.float()).abs().max()))
    return worst
