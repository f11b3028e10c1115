"""quantmill's torch reference forward for LCKV llama checkpoints (no runtime implements LCKV).

Sequential semantics, as the LCKV paper defines the model at inference: tokens are
processed in order; layer i's queries attend to the keys/values of layer
``kv_source[i]`` at the positions seen so far. When the source is above layer i, the
current token's KV does not exist yet when layer i runs, so the diagonal is masked (with
``force_nodiag``, in every layer); a query that can see no key at all (the first token
there) gets a zero attention output, as the LCKV code's zero-filled cache gives.
Sliding-window layers see the last ``sliding_window`` positions (the current one included).

Computed exactly and without iterating to a fixed point: the layers below the first one
that attends upwards, and those above the highest KV source it attends to, run over the
whole sequence at once; only the layers in between (the cyclic span) run token by token,
appending to the KV of their sources as they go. Weights, norms, MLP and RoPE are
transformers' llama modules (so a baked ``rope_parameters`` is honoured); config.json is
read as data and no remote code is run.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from quantmill.convert.lckv.config import FIELDS, LckvSpec, check_kv_tensors, parse_lckv
from quantmill.errors import InputFileError, UnsupportedError

KvStore = dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (keys, values), (batch, kv heads, positions, head dim)
_NOT_LLAMA_FIELDS = (*FIELDS, "model_type", "architectures", "auto_map", "quantization_config")
__all__ = ["LckvLlamaConfig", "LckvDecoderLayer", "LckvForCausalLM", "LlamaRotaryEmbedding", "attend"]


class LckvLlamaConfig:
    """Builds the llama config of an LCKV checkpoint, with its validated layout as ``.lckv``."""

    @staticmethod
    def from_dict(config: dict[str, Any], path: Path | None = None) -> LlamaConfig:
        spec = parse_lckv(config, path or Path("config.json"))
        llama = LlamaConfig(**{k: v for k, v in config.items() if k not in _NOT_LLAMA_FIELDS})
        llama.lckv = spec
        return llama


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, no_diag: bool, window: int | None,
           scaling: float) -> torch.Tensor:
    """Attention of queries at positions ``q_pos`` over keys at positions 0…; (batch, heads, len, dim) in, same out."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    k_pos = torch.arange(k.shape[2], device=q.device)
    allowed = k_pos[None, :] <= q_pos[:, None]
    if no_diag:
        allowed &= k_pos[None, :] != q_pos[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    scores = (q @ k.transpose(-1, -2)) * scaling
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    probs = torch.where(allowed.any(-1, keepdim=True), probs, torch.zeros_like(probs))  # nothing visible: output 0
    return probs @ v


class LckvAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.n_head, self.n_kv = int(config.num_attention_heads), int(config.num_key_value_heads or config.num_attention_heads)
        bias = bool(getattr(config, "attention_bias", False))
        self.q_proj = nn.Linear(config.hidden_size, self.n_head * self.head_dim, bias=bias)
        if config.lckv.computes_kv(layer_idx):
            self.k_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=bias)
            self.v_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=bias)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.view(*x.shape[:-1], n, self.head_dim).transpose(1, 2)


class LckvDecoderLayer(nn.Module):
    """One LCKV llama layer; ``forward`` reads and extends a KV store shared by the layers."""

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        spec: LckvSpec = config.lckv
        self.source = spec.kv_source[layer_idx]
        self.no_diag = spec.masks_diagonal(layer_idx)
        self.window = spec.window(layer_idx)
        self.computes_kv = spec.computes_kv(layer_idx)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = LckvAttention(config, layer_idx)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def queries_and_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Roped queries and, for a KV layer, its roped keys and values, from the normed input ``x``."""
        attn = self.self_attn
        q = attn._heads(attn.q_proj(x), attn.n_head)
        if not self.computes_kv:
            q, _ = apply_rotary_pos_emb(q, q, cos, sin)
            return q, None
        k = attn._heads(attn.k_proj(x), attn.n_kv)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, (k, attn._heads(attn.v_proj(x), attn.n_kv))

    def attention_output(self, q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], q_pos: torch.Tensor) -> torch.Tensor:
        """The input of o_proj: (batch, len, heads x head dim)."""
        out = attend(q, kv[0], kv[1], q_pos, self.no_diag, self.window, self.self_attn.head_dim**-0.5)
        return out.transpose(1, 2).reshape(*q.shape[:1], q.shape[2], -1)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                q_pos: torch.Tensor | None = None, store: KvStore | None = None, **_: Any) -> torch.Tensor:
        if cos is None or sin is None or q_pos is None or store is None:  # called as a plain decoder layer
            raise UnsupportedError(
                "LCKV layers attend to other layers' KV and cannot run one at a time like a llama layer; this pass does not"
                " support LCKV models (GPTQ and verify do)"
            )
        q, own = self.queries_and_kv(self.input_layernorm(hidden), cos, sin)
        if own is not None:
            old = store.get(self.layer_idx)
            store[self.layer_idx] = own if old is None else (torch.cat([old[0], own[0]], 2), torch.cat([old[1], own[1]], 2))
        empty = hidden.new_zeros(hidden.shape[0], self.self_attn.n_kv, 0, self.self_attn.head_dim)
        kv = store.get(self.source, (empty, empty))
        hidden = hidden + self.self_attn.o_proj(self.attention_output(q, kv, q_pos))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class _Body(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LckvDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)


class LckvForCausalLM(nn.Module):
    """An LCKV llama with the checkpoint's tensor names; ``forward(ids)`` gives the logits."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = _Body(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @classmethod
    def from_tensors(cls, config: dict[str, Any], tensors: Iterable[tuple[str, np.ndarray]], path: Path) -> LckvForCausalLM:
        """Build from config.json's data and (name, float array) pairs; names must match the layout exactly."""
        llama = LckvLlamaConfig.from_dict(config, path / "config.json")
        state = {name: torch.from_numpy(np.asarray(array, dtype=np.float32)) for name, array in tensors}
        check_kv_tensors(llama.lckv, set(state), path)
        with torch.device("meta"):
            model = cls(llama)
        tied = bool(getattr(llama, "tie_word_embeddings", False)) or "lm_head.weight" not in state
        if tied:
            state["lm_head.weight"] = state.get("model.embed_tokens.weight", torch.empty(0))
        wanted = {k for k in model.state_dict() if not k.endswith("inv_freq")}
        missing, unexpected = sorted(wanted - set(state)), sorted(set(state) - wanted)
        if missing or unexpected:
            raise InputFileError(path, f"tensors do not match the LCKV layout (missing {missing[:3]}, unexpected {unexpected[:3]})",
                                 "check that config.json belongs to these weights")
        model.load_state_dict(state, strict=False, assign=True)
        model.model.rotary_emb = LlamaRotaryEmbedding(config=llama)
        return model.eval()

    @classmethod
    def from_checkpoint(cls, model_dir: Path) -> LckvForCausalLM:
        """A safetensors LCKV checkpoint directory, in float32."""
        from quantmill.convert.safetensors_io import Checkpoint, to_float32
        from quantmill.jsonio import read_json_object

        model_dir = Path(model_dir)
        config = read_json_object(model_dir / "config.json", "pass an LCKV checkpoint directory with its config.json")
        with Checkpoint(model_dir) as ckpt:
            tensors = [(name, np.array(to_float32(ckpt.array(name), entry.dtype))) for name, entry in sorted(ckpt.entries.items())]
        return cls.from_tensors(config, tensors, model_dir)

    def forward(self, input_ids: torch.Tensor, store: KvStore | None = None) -> torch.Tensor:
        """Logits of ``input_ids`` (batch, positions); ``store``, if given, receives every KV layer's keys and values."""
        spec: LckvSpec = self.config.lckv
        layers = self.model.layers
        hidden = self.model.embed_tokens(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = self.model.rotary_emb(hidden, positions[None])
        store = {} if store is None else store
        low, high = spec.cyclic_span() or (spec.n_layers, spec.n_layers)
        for layer in layers[:low]:
            hidden = layer(hidden, cos, sin, positions, store)
        if low < high:
            steps = []
            for t in range(input_ids.shape[1]):
                h = hidden[:, t : t + 1]
                for layer in layers[low:high]:
                    h = layer(h, cos[:, t : t + 1], sin[:, t : t + 1], positions[t : t + 1], store)
                steps.append(h)
            hidden = torch.cat(steps, 1)
        for layer in layers[high:]:
            hidden = layer(hidden, cos, sin, positions, store)
        return self.lm_head(self.model.norm(hidden))
