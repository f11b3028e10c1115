"""Tiny llama GGUF files for tests: random weights, a trained BPE or SentencePiece vocabulary.

Weights are written the way llama.cpp's converter writes them (Q/K rows permuted), so a
GGUF -> HF conversion that forgets to undo the permutation gives different logits.
"""
from __future__ import annotations

import inspect
import io
import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """The row permutation llama.cpp's convert_hf_to_gguf.py applies to llama Q/K weights."""
    rows = weights.shape[0]
    return weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def training_text() -> str:
    """Text every Python install has: the source of two stdlib modules, plus digits and unicode."""
    extra = "Prices: 1234567 and 3.14159, café naïve Ünïcödé — 日本語 \t\ttabs  and   spaces\n\n\n"
    return inspect.getsource(textwrap) + inspect.getsource(json.decoder) + extra * 20


@dataclass
class TinyVocab:
    model: str  # "gpt2" or "llama"
    tokens: list[str]
    token_types: list[int]
    merges: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    pre: str | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    add_bos: bool | None = None


def bpe_vocab(vocab_size: int = 400, pre: str = "smollm") -> TinyVocab:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([training_text()], trainer)
    model = json.loads(tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    return TinyVocab("gpt2", tokens, types, merges=merges, pre=pre, bos_id=1, eos_id=2, unk_id=0, add_bos=False)


def spm_vocab(vocab_size: int = 400) -> TinyVocab:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text().splitlines()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    tokens, types, scores = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        kind = 1
        if sp.is_unknown(i):
            kind = 2
        elif sp.is_control(i):
            kind = 3
        elif sp.is_byte(i):
            kind = 6
        elif sp.is_unused(i):
            kind = 5
        types.append(kind)
    return TinyVocab("llama", tokens, types, scores=scores, bos_id=sp.bos_id(), eos_id=sp.eos_id(), unk_id=sp.unk_id())


@dataclass(frozen=True)
class TinyShape:
    n_layer: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 128

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def hf_weights(shape: TinyShape, n_vocab: int, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights in Hugging Face names and layout."""
    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int, scale: float = 0.08) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(shape.hidden)).astype(np.float32)

    h, hd = shape.hidden, shape.head_dim
    weights = {"model.embed_tokens.weight": mat(n_vocab, h, 0.5), "model.norm.weight": norm()}
    if not tied:
        weights["lm_head.weight"] = mat(n_vocab, h, 0.2)
    for i in range(shape.n_layer):
        p = f"model.layers.{i}."
        weights |= {
            p + "input_layernorm.weight": norm(),
            p + "self_attn.q_proj.weight": mat(shape.heads * hd, h, 0.2),
            p + "self_attn.k_proj.weight": mat(shape.kv_heads * hd, h, 0.2),
            p + "self_attn.v_proj.weight": mat(shape.kv_heads * hd, h),
            p + "self_attn.o_proj.weight": mat(h, shape.heads * hd),
            p + "post_attention_layernorm.weight": norm(),
            p + "mlp.gate_proj.weight": mat(shape.ffn, h),
            p + "mlp.up_proj.weight": mat(shape.ffn, h),
            p + "mlp.down_proj.weight": mat(h, shape.ffn),
        }
    return weights


_GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GGUF_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_GGUF_NAMES[rest]}"


def write_tiny_gguf(
    path: Path,
    vocab: TinyVocab,
    shape: TinyShape = TinyShape(),
    tied: bool = True,
    matrix_type: str = "F32",
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write a tiny llama GGUF; returns its weights in Hugging Face layout (float32, pre-quantization)."""
    import gguf

    weights = hf_weights(shape, len(vocab.tokens), tied, seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-test-llama")
    writer.add_block_count(shape.n_layer)
    writer.add_context_length(256)
    writer.add_embedding_length(shape.hidden)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_vocab_size(len(vocab.tokens))
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.scores:
        writer.add_token_scores(vocab.scores)
    special_ids = {"add_bos_token_id": vocab.bos_id, "add_eos_token_id": vocab.eos_id, "add_unk_token_id": vocab.unk_id}
    for setter, value in special_ids.items():
        if value is not None and value >= 0:
            getattr(writer, setter)(value)
    if vocab.add_bos is not None:
        writer.add_add_bos_token(vocab.add_bos)
    writer.add_chat_template(CHAT_TEMPLATE)
    qtype = gguf.GGMLQuantizationType[matrix_type]
    for hf_name in sorted(weights):
        values = weights[hf_name]
        if hf_name.endswith("q_proj.weight"):
            values = llama_cpp_permute(values, shape.heads)
        elif hf_name.endswith("k_proj.weight"):
            values = llama_cpp_permute(values, shape.kv_heads)
        if values.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name(hf_name), gguf.quants.quantize(values, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(hf_name), values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights
