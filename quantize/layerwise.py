"""Run calibration sequences through a causal LM one decoder layer at a time.

Only the token embedding rows that the sequences use and one decoder layer are ever in
memory: each layer is built empty (on the meta device) from transformers' own decoder
layer class, filled from the memory-mapped safetensors, run over every sequence, and
freed before the next one. The hidden states of all sequences (samples x seqlen x
hidden) are kept between layers; they are the only thing that grows with the inputs.

The per-layer step is the shared engine of the imatrix statistics pass and of GPTQ:

    runner = LayerwiseRunner(model_dir, token_ids)
    for step in runner.layers():
        step.run(observers={"self_attn.q_proj": fn, ...}, update=False)  # inputs only
        ...                                   # e.g. quantize those linears in place
        step.run(observers={}, update=True)   # outputs become the next layer's inputs

An observer receives each batch's input of its linear as a (tokens, in_features) tensor.
What a family's layer is and how it is walked comes from its architecture record's ``decoder``
(:class:`quantmill.convert.arch.base.DecoderSpec`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from quantmill.convert.arch import for_config
from quantmill.convert.arch.fields import check_fields
from quantmill.device import resolve_device
from quantmill.errors import InputFileError, UserInputError
from quantmill.jsonio import read_json_object
from quantmill.quantize.cost import DEFAULT_BATCH_TOKENS, KEEP_BYTES
from quantmill.quantize.spill import StreamFile

if TYPE_CHECKING:
    import torch
    from torch import nn

    from quantmill.convert.arch.base import Architecture, DecoderSpec
    from quantmill.convert.safetensors_io import Checkpoint

Observer = Callable[["torch.Tensor"], None]


def read_config(model_dir: Path) -> dict[str, Any]:
    return read_json_object(Path(model_dir) / "config.json", "re-save the model's config", "pass a Hugging Face model directory")


def arch_for(model_dir: Path, config: Mapping[str, Any], capability: str | None = "statistics") -> Architecture:
    """The model's architecture record, refusing a family that cannot go through ``capability`` (None: any known family)."""
    config_path = Path(model_dir) / "config.json"
    arch = for_config(config, config_path)
    if capability is not None:
        arch.require(capability, config_path)
    return arch


def _tensor(ckpt: Checkpoint, name: str, dtype: torch.dtype, device: torch.device, rows: np.ndarray | None = None) -> torch.Tensor:
    """Copy one tensor (or some of its rows) out of the memory map, then drop its pages."""
    import torch

    from quantmill.convert.safetensors_io import to_float32

    entry = ckpt.entries[name]
    view = ckpt.array(name)
    picked = view[rows] if rows is not None else view
    widened = np.ascontiguousarray(to_float32(picked, entry.dtype))
    if not np.isfinite(widened).all():
        raise InputFileError(entry.file, f"tensor {name!r} holds NaN or infinite values",
                             "fix or re-export the checkpoint; quantmill never quantizes non-finite weights")
    out = torch.from_numpy(widened).to(device=device, dtype=dtype)
    del view, picked
    ckpt.release(name)
    return out


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@functools.cache
def bound_heap_growth() -> bool:
    """Make glibc serve every block of 1 MiB or more with mmap, so freeing it returns it to the OS.

    By default glibc raises that threshold after the first large free, after which each
    layer's weights and activations come from the heap, where small long-lived tensors pin
    them: peak RSS then creeps up layer after layer (measured: +380 MB over SmolLM2's 30
    layers). A fixed threshold keeps peak memory flat. Process-wide; no-op off glibc.
    """
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def release_freed_memory() -> None:
    """Hand free heap pages back to the OS (glibc ``malloc_trim``).

    A layer's tensors are freed by reference counting as soon as the step drops them; a
    full ``gc.collect()`` here would cost ~0.3 s per layer for nothing.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class Batches:
    """Sample slices, re-iterable; after each slice, the runner drops that slice's pages of its spilled streams."""

    def __init__(self, slices: list[slice], runner: LayerwiseRunner) -> None:
        self.slices, self.runner = slices, runner

    def __iter__(self) -> Iterator[slice]:
        for rows in self.slices:
            yield rows
            if self.runner.streams:
                self.runner.release(rows)

    def __len__(self) -> int:
        return len(self.slices)


class DecoderLayerStep:
    """One decoder layer, loaded, with the hidden states of every calibration sequence."""

    def __init__(self, runner: LayerwiseRunner, index: int, module: nn.Module) -> None:
        self.runner = runner
        self.index = index
        self.module = module
        self.updated = False

    @property
    def decoder(self) -> DecoderSpec:
        return self.runner.decoder

    def linears(self) -> dict[str, nn.Linear]:
        """The layer's linears by relative name, in execution order."""
        return {name: cast("nn.Linear", self.module.get_submodule(name)) for name in self.decoder.linear_names}

    def hf_name(self, linear: str) -> str:
        return self.decoder.hf_linear_name(self.index, linear)

    def run(self, observers: Mapping[str, Observer], update: bool) -> None:
        """Forward every sequence; feed linear inputs to ``observers``; optionally advance the hidden states."""
        import torch

        if self.updated:
            raise RuntimeError(f"layer {self.index} already advanced its hidden states")
        handles = []
        for name, observer in sorted(observers.items()):
            linear = self.module.get_submodule(name)

            def hook(_mod: nn.Module, args: tuple[torch.Tensor, ...], _obs: Observer = observer) -> None:
                x = args[0]
                _obs(x.reshape(-1, x.shape[-1]))

            handles.append(linear.register_forward_pre_hook(hook))
        try:
            hidden = self.runner.hidden
            with torch.inference_mode():
                for rows in self.runner.batches(hidden.shape[0]):
                    batch = hidden[rows]
                    out = self.runner.forward_layer(self.module, batch)
                    if update:
                        batch.copy_(out)
        finally:
            for handle in handles:
                handle.remove()
        self.updated = update


class LayerwiseRunner:
    """Embeds the calibration sequences, then yields one loaded decoder layer at a time."""

    def __init__(
        self,
        model_dir: Path,
        token_ids: np.ndarray,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        progress: bool = True,
        desc: str = "layers",
        capability: str = "statistics",
        spill_dir: Path | None = None,
    ) -> None:
        import torch

        self.model_dir = Path(model_dir)
        self.raw_config = read_config(self.model_dir)
        self.arch = arch_for(self.model_dir, self.raw_config, capability)
        check_fields(self.raw_config, self.model_dir / "config.json")
        assert self.arch.decoder is not None  # guaranteed by the capability
        self.decoder: DecoderSpec = self.arch.decoder
        ids = np.asarray(token_ids)
        if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
            raise UserInputError(f"calibration token ids must be a non-empty (samples, seqlen) array, got shape {ids.shape}")
        self.token_ids = ids.astype(np.int64)
        self.device = torch.device(resolve_device(device))  # auto -> cuda or cpu; an unseen CUDA device refused
        self.dtype = getattr(torch, dtype)
        self.batch_size = max(1, batch_tokens // ids.shape[1])
        self.progress = progress
        self.desc = desc
        config_cls, self._layer_cls, self._rotary_cls = self.decoder.classes()
        self.config = config_cls.from_dict(self.arch.transformers_config(self.raw_config, self.model_dir / "config.json"))
        self.config._attn_implementation = "sdpa"  # causal by itself when no mask is given
        self.n_layers = int(self.config.num_hidden_layers)
        self.hidden: torch.Tensor = torch.empty(0)
        self._cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None
        # spilling (quantmill.quantize.spill): activation streams in memory-mapped files under spill_dir
        self.spill_dir = None if spill_dir is None else Path(spill_dir)
        self.streams: dict[str, StreamFile] = {}
        self.keep_bytes = KEEP_BYTES if spill_dir is None else 0  # inputs kept between a flow's passes, else recomputed

    @property
    def spilling(self) -> bool:
        return self.spill_dir is not None

    def batches(self, samples: int) -> Batches:
        """The sample slices of one pass over the streams; each slice's pages of spilled streams are released after it."""
        return Batches([slice(s, min(s + self.batch_size, samples)) for s in range(0, samples, self.batch_size)], self)

    def new_stream(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A float32 buffer of ``shape`` (samples first): in memory, or spilled to ``spill_dir/name.npy``."""
        import torch

        if self.spill_dir is None:
            return torch.empty(shape, dtype=torch.float32, device=self.device)
        self.drop_stream(name)
        return self.adopt_stream(name, StreamFile.create(self.spill_dir / f"{name}.npy", shape))

    def adopt_stream(self, name: str, stream: StreamFile) -> torch.Tensor:
        self.streams[name] = stream
        return stream.tensor

    def stream_file(self, tensor: torch.Tensor) -> StreamFile | None:
        """The spilled stream whose tensor ``tensor`` is (None: it lives in memory)."""
        return next((f for f in self.streams.values() if f.tensor is tensor), None)

    def drop_stream(self, name: str) -> None:
        stream = self.streams.pop(name, None)
        if stream is not None:
            stream.close()
            stream.path.unlink(missing_ok=True)

    def release(self, rows: slice) -> None:
        for stream in self.streams.values():
            stream.release(rows)

    def drop_streams(self) -> None:
        for name in sorted(self.streams):
            self.drop_stream(name)

    def position_embeddings(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._cos_sin  # type: ignore[misc]
        return cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)

    def forward_layer(self, layer: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """One decoder layer over one batch of hidden states (the layer's own forward, causal, no mask)."""
        out = layer(batch, position_embeddings=self.position_embeddings(batch.shape[0]), **self.decoder.layer_kwargs)
        return out[0] if isinstance(out, tuple) else out  # some layers return (hidden, attention weights)

    def _embed(self, ckpt: Checkpoint) -> None:
        import torch

        name = self.decoder.embed_weight
        if name not in ckpt:
            raise InputFileError(self.model_dir, f"checkpoint has no {name!r} tensor", "pass a complete checkpoint")
        rows = ckpt.entries[name].shape[0]
        top = int(self.token_ids.max())
        if self.token_ids.min() < 0 or top >= rows:
            raise UserInputError(
                f"{self.model_dir}: calibration token id {top} is outside the embedding's {rows} rows;"
                " tokenize with this model's own tokenizer"
            )
        unique, inverse = np.unique(self.token_ids, return_inverse=True)
        table = _tensor(ckpt, name, self.dtype, self.device, rows=unique)
        index = torch.from_numpy(inverse.reshape(self.token_ids.shape)).to(self.device)
        if self.spilling:
            self.hidden = self.new_stream("hidden", (*self.token_ids.shape, table.shape[1]))
            for part in self.batches(self.token_ids.shape[0]):
                self.hidden[part] = table[index[part]]
        else:
            self.hidden = table[index]
        del table, index
        self._rotary()

    def _rotary(self) -> None:
        import torch

        rotary = self._rotary_cls(config=self.config).to(self.device)
        positions = torch.arange(self.token_ids.shape[1], device=self.device)[None, :]
        probe = torch.zeros(1, self.token_ids.shape[1], self.config.hidden_size, dtype=self.dtype, device=self.device)
        with torch.inference_mode():
            self._cos_sin = rotary(probe, positions)

    def resume(self, hidden: torch.Tensor) -> None:
        """Continue from checkpointed hidden states (samples x seqlen x hidden) instead of the embedding."""
        expected = (*self.token_ids.shape, int(self.config.hidden_size))
        if tuple(hidden.shape) != expected:
            raise RuntimeError(f"checkpointed hidden states have shape {tuple(hidden.shape)}, expected {expected}")
        self.hidden = hidden.to(device=self.device, dtype=self.dtype)
        self._rotary()

    def _load_layer(self, ckpt: Checkpoint, index: int) -> nn.Module:
        import torch

        with torch.device("meta"):
            module = self._layer_cls(self.config, layer_idx=index)
        prefix = self.decoder.layer_prefix.format(index=index)
        state: dict[str, torch.Tensor] = {}
        for key in sorted(module.state_dict()):
            name = prefix + key
            if name not in ckpt:
                raise InputFileError(self.model_dir, f"checkpoint has no tensor {name!r}", "pass a complete checkpoint")
            state[key] = _tensor(ckpt, name, self.dtype, self.device)
        module.load_state_dict(state, strict=True, assign=True)
        return module.eval()

    def layers(self, start: int = 0, hidden: torch.Tensor | None = None) -> Iterator[DecoderLayerStep]:
        """Yield each decoder layer in order; the caller must ``run(..., update=True)`` each one.

        ``start`` > 0 continues at that layer from ``hidden``, the states a checkpoint kept after layer ``start - 1``.
        """
        from tqdm import tqdm

        from quantmill.convert.safetensors_io import Checkpoint

        bound_heap_growth()
        with Checkpoint(self.model_dir) as ckpt:
            if start:
                assert hidden is not None
                self.resume(hidden)
            else:
                self._embed(ckpt)
            bar = tqdm(range(start, self.n_layers), desc=self.desc, unit="layer", disable=not self.progress, leave=False)
            for index in bar:
                step = DecoderLayerStep(self, index, self._load_layer(ckpt, index))
                yield step
                if not step.updated:
                    raise RuntimeError(f"layer {index} was not advanced: call step.run(..., update=True)")
                step.module = None  # type: ignore[assignment]
                del step
                release_freed_memory()
            bar.close()
        self.hidden = self.hidden.new_empty(0)
        self.drop_stream("hidden")
