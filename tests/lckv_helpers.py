"""Tiny LCKV checkpoints for tests, and a straightforward per-layer LCKV forward to check the reference against.

A tiny LCKV model is a tiny random llama saved by transformers, with the k_proj/v_proj of
the layers that compute no KV removed and config.json turned into an ``lckv-llama`` one
(with an ``auto_map`` whose code file would abort the test if anything ever ran it).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from conftest import SP_VOCAB_SIZE, build_tiny_llama

W2_LAYER_TYPES = "0_4_4_4_4_5"  # the w2 pattern on 6 layers: 0 and 5 standard, 1..4 use layer 4's KV


def build_tiny_lckv(out: Path, tokenizer_dir: Path, layer_types: str = W2_LAYER_TYPES, *, vocab_size: int = SP_VOCAB_SIZE, seed: int = 0,
                    lckv: dict[str, Any] | None = None, **overrides: Any) -> Path:
    from safetensors.numpy import load_file, save_file

    settings = {"num_hidden_layers": len(layer_types.split("_")), "max_position_embeddings": 256, "tie_word_embeddings": False, **overrides}
    build_tiny_llama(out, tokenizer_dir, vocab_size, seed=seed, **settings)
    sources = {int(entry.rstrip("s")) for entry in layer_types.split("_")}
    weights = load_file(str(out / "model.safetensors"))
    kept = {k: v for k, v in weights.items()
            if not (".k_proj." in k or ".v_proj." in k) or int(k.split(".")[2]) in sources}
    save_file(kept, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config.update(model_type="lckv-llama", architectures=["LCKVLlamaForCausalLM"], layer_types=layer_types,
                  auto_map={"AutoConfig": "configuration_lckv.LCKVLlamaConfig", "AutoModelForCausalLM": "modeling_lckv.LCKVLlamaForCausalLM"},
                  **{"forward_passes": 7, "backward_passes": 2, "sliding_window": 4096, "use_sequential": False,
                     "force_nodiag": False, **(lckv or {})})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for name in ("configuration_lckv.py", "modeling_lckv.py"):
        (out / name).write_text("raise SystemExit('remote code was executed')\n")
    return out


def lckv_fields(model_dir: Path) -> dict[str, Any]:
    config = json.loads((model_dir / "config.json").read_text())
    return {k: config[k] for k in ("layer_types", "forward_passes", "backward_passes", "sliding_window", "use_sequential", "force_nodiag")}


def naive_lckv_logits(model_dir: Path, tokens: list[int], weights: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Token after token, layer after layer, head after head, in float64: layer i attends to whatever KV its
    source layer has produced so far (a source above has not produced the current token's yet)."""
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    w = {k: v.astype(np.float64) for k, v in (weights or load_file(str(model_dir / "model.safetensors"))).items()}
    entries = cfg["layer_types"].split("_")
    sources, sliding = [int(e.rstrip("s")) for e in entries], [e.endswith("s") for e in entries]
    n_head, n_kv, dim, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["rms_norm_eps"]
    inv_freq = 1.0 / cfg.get("rope_theta", 10000.0) ** (np.arange(0, dim, 2) / dim)

    def rms(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x / math.sqrt(float((x * x).mean()) + eps) * weight

    def rope(x: np.ndarray, t: int) -> np.ndarray:  # one head, rotate-half layout
        cos, sin = np.cos(t * inv_freq), np.sin(t * inv_freq)
        a, b = x[: dim // 2], x[dim // 2 :]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin])

    cache: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {i: [] for i in set(sources)}  # per position: (k, v) per kv head
    out_rows = []
    for t, token in enumerate(tokens):
        h = w["model.embed_tokens.weight"][token].copy()
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            x = rms(h, w[p + "input_layernorm.weight"])
            q = (w[p + "self_attn.q_proj.weight"] @ x).reshape(n_head, dim)
            if i in cache:
                k = (w[p + "self_attn.k_proj.weight"] @ x).reshape(n_kv, dim)
                v = (w[p + "self_attn.v_proj.weight"] @ x).reshape(n_kv, dim)
                cache[i].append((np.stack([rope(kh, t) for kh in k]), v))
            visible = [j for j in range(len(cache[sources[i]]))
                       if not (cfg["force_nodiag"] and j == t) and not (sliding[i] and j <= t - cfg["sliding_window"])]
            heads = []
            for head in range(n_head):
                g = head // (n_head // n_kv)
                qh = rope(q[head], t)
                if not visible:
                    heads.append(np.zeros(dim))
                    continue
                scores = np.array([qh @ cache[sources[i]][j][0][g] / math.sqrt(dim) for j in visible])
                probs = np.exp(scores - scores.max())
                probs /= probs.sum()
                heads.append(sum(pr * cache[sources[i]][j][1][g] for pr, j in zip(probs, visible, strict=True)))
            h = h + w[p + "self_attn.o_proj.weight"] @ np.concatenate(heads)
            x = rms(h, w[p + "post_attention_layernorm.weight"])
            gate = w[p + "mlp.gate_proj.weight"] @ x
            h = h + w[p + "mlp.down_proj.weight"] @ (gate / (1 + np.exp(-gate)) * (w[p + "mlp.up_proj.weight"] @ x))
        out_rows.append(w["lm_head.weight"] @ rms(h, w["model.norm.weight"]))
    return np.array(out_rows)
