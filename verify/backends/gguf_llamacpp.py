"""GGUF files through libllama (llama-cpp-python's low-level ctypes API), the way llama-perplexity runs them.

Several chunks go into one ``llama_decode`` call, one sequence id each, in a context of
``chunks × n_ctx`` cells split per sequence (not unified), so every chunk attends only to
itself; only the scored positions request logits. Flash attention is left on ``auto`` as
llama.cpp's tools do (llama-cpp-python's default, off, halves CPU speed).
"""
from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from quantmill.errors import InputFileError, ToolError, UnsupportedError
from quantmill.llama_lib import binding, libllama_log
from quantmill.quantize.gguf.inspect import GGUFSummary, summarize_gguf
from quantmill.verify.backends.base import (
    ArtifactInfo,
    BackendOptions,
    ChunkLogProbs,
    LogProbBackend,
    log_softmax_rows,
)
from quantmill.verify.tokens import ChunkPlan


def gguf_quant_type(summary: GGUFSummary) -> str:
    """The name of a GGUF's ``general.file_type`` (Q4_K_M ...); without one, its commonest tensor type by bytes."""
    from quantmill.quantize.gguf.types import FILE_TYPES

    names = {row.ftype_value: name for name, row in FILE_TYPES.items()}
    if summary.file_type in names:
        return names[summary.file_type]
    by_bytes = sorted(summary.by_type.items(), key=lambda item: (-item[1].n_bytes, item[0]))
    return by_bytes[0][0] if by_bytes else "GGUF"


FLASH_ATTN_AUTO = -1  # LLAMA_FLASH_ATTN_TYPE_AUTO
DEFAULT_UBATCH = 512  # llama.cpp's default physical batch


class LlamaCppBackend(LogProbBackend):
    """A GGUF model loaded in libllama; contexts are made per plan (they depend on n_ctx)."""

    def __init__(self, path: Path, options: BackendOptions) -> None:
        llama_cpp = binding()
        self._llama = llama_cpp
        self.path = Path(path)
        self.options = options
        summary = summarize_gguf(self.path)
        summary.require("verify-gguf")
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        if options.on_cuda:  # every layer on the GPU, as llama-perplexity -ngl 99 runs it
            if not llama_cpp.llama_supports_gpu_offload():
                raise UnsupportedError(f"{self.path}: this llama-cpp-python has no GPU backend, so a GGUF cannot be verified "
                                       "on cuda; install the CUDA wheel of scripts/llama_cpp_cuda_wheel.sh, or verify on cpu")
            params.n_gpu_layers = 999
            params.main_gpu = int(options.device.partition(":")[2] or 0)
        with libllama_log() as log:
            self._model = llama_cpp.llama_model_load_from_file(os.fsencode(self.path), params)
        if not self._model:
            raise InputFileError(self.path, f"libllama cannot load it ({log.error_summary()})", "re-create the GGUF")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.info = ArtifactInfo(self.path, "gguf", summary.file_size, summary.bpw, n_vocab, gguf_quant_type(summary))

    # ----------------------------------------------------------------- lifecycle

    def close(self) -> None:
        if getattr(self, "_model", None):
            self._llama.llama_model_free(self._model)
            self._model = None

    # ----------------------------------------------------------------- checks

    def check_vocabulary(self, plan: ChunkPlan, id_to_token: dict[int, str]) -> None:
        """Every token id the plan uses must name the same token text in this GGUF."""
        self._check_token_ids(plan, id_to_token, "vocabulary has {} tokens", (self.path, self._token_text))

    def own_tokens(self, text: str) -> np.ndarray:
        """``text`` tokenized by this GGUF's own tokenizer, as llama-perplexity does (special tokens added, BOS per the file)."""
        lc = self._llama
        data = text.encode("utf-8")
        capacity = len(data) + 16
        while True:
            out = (lc.llama_token * capacity)()
            n = lc.llama_tokenize(self._vocab, data, len(data), out, capacity, True, False)
            if n >= 0:
                return np.ctypeslib.as_array(out)[:n].astype(np.int32)
            capacity = -n

    def _token_text(self, token_id: int) -> str | None:
        raw = self._llama.llama_vocab_get_text(self._vocab, token_id)
        return raw.decode("utf-8", errors="replace") if raw is not None else None

    # ----------------------------------------------------------------- evaluation

    def iter_logprobs(self, plan: ChunkPlan) -> Iterator[ChunkLogProbs]:
        lc = self._llama
        n_seq = max(1, min(self.options.chunks_for(plan.n_ctx), plan.n_chunks))
        n_tokens_max = n_seq * plan.n_ctx
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = n_tokens_max
        cparams.n_batch = n_tokens_max
        cparams.n_ubatch = min(DEFAULT_UBATCH, n_tokens_max)
        cparams.n_seq_max = n_seq
        cparams.n_threads = self.options.n_threads
        cparams.n_threads_batch = self.options.n_threads
        cparams.flash_attn_type = FLASH_ATTN_AUTO
        cparams.kv_unified = False
        cparams.no_perf = True
        with libllama_log() as log:
            ctx = lc.llama_init_from_model(self._model, cparams)
        if not ctx:
            raise ToolError(f"{self.path}: libllama could not create a context ({log.error_summary()})")
        batch = lc.llama_batch_init(n_tokens_max, 0, 1)
        try:
            yield from self._run(ctx, batch, plan, n_seq)
        finally:
            lc.llama_batch_free(batch)
            lc.llama_free(ctx)

    def _run(self, ctx: Any, batch: Any, plan: ChunkPlan, n_seq: int) -> Iterator[ChunkLogProbs]:
        lc = self._llama
        n_ctx, first, n_scored = plan.n_ctx, plan.first, plan.n_scored
        capacity = n_seq * n_ctx
        token = np.ctypeslib.as_array(batch.token, shape=(capacity,))
        pos = np.ctypeslib.as_array(batch.pos, shape=(capacity,))
        n_seq_id = np.ctypeslib.as_array(batch.n_seq_id, shape=(capacity,))
        wants_logits = np.ctypeslib.as_array(batch.logits, shape=(capacity,))
        positions = np.arange(n_ctx, dtype=np.int32)
        scored = ((positions >= first) & (positions < n_ctx - 1)).astype(np.int8)
        memory = lc.llama_get_memory(ctx)
        n_vocab = self.info.n_vocab
        for group in plan.groups(n_seq):
            n = len(group) * n_ctx
            for s, index in enumerate(group):
                sl = slice(s * n_ctx, (s + 1) * n_ctx)
                token[sl] = plan.chunk_input(index)
                pos[sl] = positions
                wants_logits[sl] = scored
                for i in range(sl.start, sl.stop):
                    batch.seq_id[i][0] = s
            n_seq_id[:n] = 1
            batch.n_tokens = n
            lc.llama_memory_clear(memory, True)
            with libllama_log() as log:
                status = lc.llama_decode(ctx, batch)
            if status != 0:
                raise ToolError(f"{self.path}: llama_decode failed with status {status} ({log.error_summary()})")
            pointer = lc.llama_get_logits(ctx)
            logits = np.ctypeslib.as_array(
                ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(len(group) * n_scored, n_vocab)
            )
            for s, index in enumerate(group):
                rows = logits[s * n_scored : (s + 1) * n_scored]
                yield ChunkLogProbs(index, log_softmax_rows(rows), plan.chunk_targets(index))
