"""What a layer-by-layer pass costs in memory, from the model's shape alone (config.json, no weights).

One model serves the engine (spill or not, under ``--max-memory``; refuse a budget no plan fits)
and ``quantmill run --dry-run`` (each stage's predicted peak resident memory). The terms are the
pass's real allocations: the process (Python, torch, transformers), the decoder layer in float32
(twice for GPTQ: the float layer and one branch's working copy), the activation streams
(samples x seqlen x hidden float32 each), a flow's kept inputs, one group's GPTQ working set
(its Hessian and the stacked weights), and one batch's intermediates. Checked against measured
peak RSS in BENCHMARKS.md ("memory model").
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

LOG = logging.getLogger("quantmill.memory")

DEFAULT_BATCH_TOKENS = 4096  # tokens per forward batch of a layer-by-layer pass
KEEP_BYTES = 2 << 30  # a flow's inputs kept between its passes up to this size (in memory), else recomputed
# The processes' own footprint, measured (BENCHMARKS.md "memory model"): with torch + transformers imported and torch's
# thread pools started; a stage that only moves files (numpy, safetensors, pydantic); tokenizing; converting to GGUF.
PROCESS_BYTES = 420 * 10**6
LIGHT_PROCESS_BYTES = 255 * 10**6
TOKENIZE_PROCESS_BYTES = 345 * 10**6
CONVERT_PROCESS_BYTES = 350 * 10**6
LIBLLAMA_PROCESS_BYTES = 315 * 10**6
F32 = 4


def intermediate_size(config: Any) -> int:
    """The MLP's inner width (Falcon: ``ffn_hidden_size``, else 4 x hidden)."""
    hidden = int(config.hidden_size)
    return int(getattr(config, "intermediate_size", None) or getattr(config, "ffn_hidden_size", None) or 4 * hidden)


@dataclass(frozen=True)
class PassShape:
    """The shape facts a pass's memory depends on."""

    samples: int
    seqlen: int
    hidden: int
    intermediate: int
    layer_params: int  # parameters of one decoder layer
    batch_tokens: int

    @classmethod
    def of(cls, config: Any, layer_params: int, samples: int, seqlen: int, batch_tokens: int) -> PassShape:
        """From a transformers config (``hidden_size``; ``intermediate_size``, or Falcon's ``ffn_hidden_size`` / 4 x)."""
        return cls(samples, seqlen, int(config.hidden_size), intermediate_size(config), int(layer_params), batch_tokens)

    @property
    def stream_bytes(self) -> int:
        return self.samples * self.seqlen * self.hidden * F32

    @property
    def batch_rows(self) -> int:
        return max(1, self.batch_tokens // self.seqlen)

    @property
    def batch_bytes(self) -> int:
        """One batch's intermediates: the MLP's gate, up and product, attention's q/k/v/out, the residual."""
        tokens = self.batch_rows * self.seqlen
        return tokens * (3 * self.intermediate + 6 * self.hidden) * F32

    @property
    def gptq_group_bytes(self) -> int:
        """The largest group's GPTQ working set: Hessian (in x in, and its inverse) and weights (stacked, 3 copies)."""
        wide = max(self.hidden, self.intermediate)
        stacked = 2 * self.intermediate * self.hidden  # gate + up, or down: the largest weight block
        return 2 * wide * wide * F32 + 3 * stacked * F32


@dataclass(frozen=True)
class ModelShape:
    """A model's size facts, from config.json (and the safetensors headers when there are weights)."""

    n_params: int
    n_layers: int
    layer_params: int
    hidden: int
    intermediate: int
    vocab: int

    @property
    def largest_tensor(self) -> int:
        """Elements of the largest matrix: the embedding or an MLP projection."""
        return max(self.vocab * self.hidden, self.intermediate * self.hidden)

    def pass_shape(self, samples: int, seqlen: int, batch_tokens: int) -> PassShape:
        return PassShape(samples, seqlen, self.hidden, self.intermediate, self.layer_params, batch_tokens)


def copy_peak(shape: ModelShape, converts: bool) -> int:
    """The source stage: files linked or copied; ``converts`` (a GGUF or pickle source): tensors widened one at a time."""
    return (PROCESS_BYTES + 3 * shape.largest_tensor * F32) if converts else LIGHT_PROCESS_BYTES


def streaming_peak(shape: ModelShape) -> int:
    """A stage that streams tensors one at a time through torch (the LoRA merge): the largest, read, widened, written."""
    return PROCESS_BYTES + 3 * shape.largest_tensor * F32


def convert_peak(shape: ModelShape) -> int:
    """HF -> GGUF: tensors converted and written in slices; the footprint hardly grows with the model."""
    return CONVERT_PROCESS_BYTES + shape.largest_tensor * 2 // 10


@dataclass(frozen=True)
class Peak:
    """A peak RSS of which ``mapped`` bytes are memory-mapped files: counted in RSS, but reclaimable page cache."""

    rss: int
    mapped: int = 0


def libllama_quantize_peak(shape: ModelShape) -> Peak:
    """llama_model_quantize: the F16 input is read through a memory map (two thirds of its pages were resident at the
    peak, measured; they count in RSS) plus per-tensor buffers."""
    mapped = int(0.67 * shape.n_params * 2)
    return Peak(LIBLLAMA_PROCESS_BYTES + mapped, mapped)


def mix_peak(shape: ModelShape, refine_tokens: int | None) -> Peak:
    """A budgeted GGUF mix: the F16 GGUF memory-mapped while its tensors are measured, then libllama's write; with
    ``refine_tokens`` also the float32 model in torch, the hidden states at every layer's input and the reference's
    log-probabilities (about 3 live copies). From the allocations, not yet fitted to a measured peak."""
    write = libllama_quantize_peak(shape)
    if refine_tokens is None:
        return write
    model = PROCESS_BYTES + shape.n_params * F32 + 2 * shape.largest_tensor * F32
    activations = refine_tokens * (shape.n_layers * shape.hidden + 3 * shape.vocab) * F32
    return Peak(max(write.rss, model + activations + shape.n_params * 2), shape.n_params * 2)


def calibrate_peak(shape: ModelShape, corpus: str) -> int:
    """Tokenizing a corpus; ``generated`` sequences come from the whole model, loaded in float32."""
    return PROCESS_BYTES + shape.n_params * F32 if corpus == "generated" else TOKENIZE_PROCESS_BYTES


def verify_peak(shape: ModelShape, n_ctx: int) -> Peak:
    """verify: 8.07 bytes per parameter (least squares over 28M-352M, measured: two float32 models in torch at once,
    the reference and a dequantized GPTQ branch, while a memory-mapped F16 GGUF's 2 bytes are page cache), and the
    log-probabilities of one context (n_ctx x vocab float32, about 5.4 live copies)."""
    mapped = shape.n_params * 2
    return Peak(PROCESS_BYTES + int(8.07 * shape.n_params) + int(5.4 * n_ctx * shape.vocab * F32), mapped)


def gptq_peak(shape: PassShape, branches: int, spill: bool, keep_bytes: int) -> int:
    """Peak resident bytes of a GPTQ pass over ``branches`` branches (``spill``: streams in files)."""
    layer = shape.layer_params * F32
    down_inputs = shape.samples * shape.seqlen * shape.intermediate * F32
    if spill:  # a batch of the hidden and attention streams is mapped at a time
        streams = 3 * min(shape.batch_rows, shape.samples) * shape.seqlen * shape.hidden * F32
    else:
        streams = branches * shape.stream_bytes + shape.stream_bytes  # every branch, and the attention outputs
        streams += down_inputs if down_inputs <= keep_bytes else 0
    return PROCESS_BYTES + 2 * layer + streams + shape.gptq_group_bytes + shape.batch_bytes


def statistics_peak(shape: PassShape, spill: bool) -> int:
    """Peak resident bytes of the statistics (imatrix) pass."""
    layer = shape.layer_params * F32
    stream = min(shape.batch_rows, shape.samples) * shape.seqlen * shape.hidden * F32 if spill else shape.stream_bytes
    return PROCESS_BYTES + layer + stream + shape.batch_bytes + 2 * max(shape.hidden, shape.intermediate) * 8


def planned_peak(in_memory: int, spilled: int, budget: int | None) -> int:
    """The peak a pass will have: spilled when the budget is below its in-memory peak (a plan never refuses here)."""
    return spilled if budget is not None and in_memory > budget else in_memory


def needs_spill(what: str, in_memory: int, spilled: int, budget: int | None, model_dir: Any) -> bool:
    """Whether a pass predicted at ``in_memory`` bytes (``spilled`` with its streams on disk) must spill to fit
    ``budget``; a budget that neither fits is refused before any work."""
    from quantmill.errors import UserInputError
    from quantmill.units import human_bytes

    if budget is None or in_memory <= budget:
        return False
    if spilled > budget:
        raise UserInputError(f"memory budget {human_bytes(budget)}: {what} of {model_dir} needs about "
                             f"{human_bytes(spilled)} even with its activation streams on disk ({human_bytes(in_memory)} "
                             "in memory); raise the budget (--max-memory / resources.memory) or use fewer calibration tokens")
    LOG.info("%s: activation streams spilled to disk (about %s in memory, budget %s, about %s spilled)", what,
             human_bytes(in_memory), human_bytes(budget), human_bytes(spilled))
    return True


def layer_params(entries: Any, prefix: str) -> int:
    """Parameters of the decoder layer whose tensor names start with ``prefix`` (safetensors header entries)."""
    return sum(int(e.n_elements) for name, e in entries.items() if name.startswith(prefix))


def checkpoint_disk(shape: PassShape, streams: int, spilled: bool) -> int:
    """Disk a layer-by-layer pass holds while it runs: each stream's checkpoint, twice while one is replaced by the
    next, and the working copy of a spilled stream (its packed tensors' spool is counted with the outputs)."""
    return (2 + int(spilled)) * streams * shape.stream_bytes
