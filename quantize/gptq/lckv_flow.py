"""GPTQ's walk through one LCKV decoder layer (``model_type: lckv-llama``).

An LCKV layer attends to the keys and values of its source layer, which may lie above it:
no layer-by-layer pass can compute those exactly (the exact model runs token by token).
For calibration, the KV of a source above comes from one float forward of quantmill's
reference model over the calibration sequences (the float model's own KV, as the LCKV
training iterations converge to); the KV of a source at or below the layer comes from the
branch's own stream, i.e. from that source layer after quantization. Everything else is
the pre-norm walk: q (with k and v where the layer computes KV) read ``norm1(h)`` and share
one Hessian; o_proj's inputs are computed with the quantized q/k/v; ``h' = h + o(...)``;
gate/up read ``norm2(h')``; down_proj's inputs come from the quantized gate/up.

Without true-sequential, every group's Hessian is taken from the float layer first (on a
copy of the stream), then the quantized layer advances the stream.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast

import torch

from quantmill.convert.lckv.model import KvStore, LckvDecoderLayer, LckvForCausalLM
from quantmill.quantize.gptq.flows import QuantizeGroup, _batches, hessian_of
from quantmill.quantize.gptq.packing import check_packable

if TYPE_CHECKING:
    from quantmill.quantize.layerwise import LayerwiseRunner


class LckvFlow:
    def __init__(self, groups: tuple[tuple[str, ...], ...]) -> None:
        self.groups = groups
        self._streams: dict[int, KvStore] = {}  # per branch (keyed by its activation stream): KV of layers done
        self._float_kv: KvStore | None = None

    def _reference_kv(self, runner: LayerwiseRunner) -> KvStore:
        """The float model's KV of every source that some lower layer attends to."""
        spec = runner.config.lckv
        needed = sorted({spec.kv_source[i] for i in range(spec.n_layers) if spec.attends_above(i)})
        if not needed:
            return {}
        model = LckvForCausalLM.from_checkpoint(runner.model_dir)
        ids = torch.from_numpy(runner.token_ids)
        parts: list[KvStore] = []
        with torch.inference_mode():
            for start in range(0, ids.shape[0], runner.batch_size):
                store: KvStore = {}
                model(ids[start : start + runner.batch_size], store=store)
                parts.append({i: store[i] for i in needed})
        return {i: (torch.cat([p[i][0] for p in parts]), torch.cat([p[i][1] for p in parts])) for i in needed}

    def state(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """The keys and values this branch's quantized layers computed so far (what later layers attend to)."""
        store = self._streams.get(id(hidden), {})
        return {f"{part}/{index}": kv[i] for index, kv in sorted(store.items()) for i, part in enumerate(("keys", "values"))}

    def restore(self, hidden: torch.Tensor, arrays: dict[str, torch.Tensor]) -> None:
        indices = sorted({int(name.split("/")[1]) for name in arrays})
        self._streams[id(hidden)] = {i: (arrays[f"keys/{i}"], arrays[f"values/{i}"]) for i in indices}

    def run(self, layer: LckvDecoderLayer, hidden: torch.Tensor, runner: LayerwiseRunner, quantize: QuantizeGroup,
            true_sequential: bool) -> None:
        if self._float_kv is None:
            self._float_kv = self._reference_kv(runner)
        store = self._streams.setdefault(id(hidden), {})
        if layer.computes_kv:
            for name in ("self_attn.k_proj", "self_attn.v_proj"):
                linear = cast(torch.nn.Linear, layer.get_submodule(name))
                check_packable(f"layer {layer.layer_idx} {name}", linear.in_features, linear.out_features)
        if true_sequential:
            self._walk(layer, hidden, runner, quantize, store)
            return
        collected: list[tuple[Sequence[str], dict]] = []
        self._walk(layer, hidden.clone(), runner, lambda names, hessians: collected.append((names, hessians)), dict(store))
        for names, hessians in collected:
            quantize(names, hessians)
        self._walk(layer, hidden, runner, lambda names, hessians: None, store)

    def _walk(self, layer: LckvDecoderLayer, hidden: torch.Tensor, runner: LayerwiseRunner,
              quantize: Callable[[Sequence[str], dict], None], store: KvStore) -> None:
        assert self._float_kv is not None
        index, batches = layer.layer_idx, _batches(hidden, runner)
        cos, sin = runner.position_embeddings(1)
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        attn, mlp = layer.self_attn, layer.mlp
        attn_in = ("self_attn.q_proj", *(("self_attn.k_proj", "self_attn.v_proj") if layer.computes_kv else ()))
        with torch.inference_mode():
            h_in = hessian_of(layer.input_layernorm(hidden[rows]) for rows in batches)
        quantize(attn_in, dict.fromkeys(attn_in, h_in))
        del h_in
        with torch.inference_mode():
            projected = [layer.queries_and_kv(layer.input_layernorm(hidden[rows]), cos, sin) for rows in batches]
            if layer.computes_kv:
                store[index] = (torch.cat([kv[0] for _, kv in projected]), torch.cat([kv[1] for _, kv in projected]))  # type: ignore[index]
            source = store if layer.source <= index else self._float_kv
            keys, values = source[layer.source]
            attn_inputs = [layer.attention_output(q, (keys[rows], values[rows]), positions) for (q, _), rows in zip(projected, batches, strict=True)]
            del projected
            h_out = hessian_of(attn_inputs)
        quantize(("self_attn.o_proj",), {"self_attn.o_proj": h_out})
        del h_out
        with torch.inference_mode():
            for rows, x in zip(batches, attn_inputs, strict=True):
                hidden[rows] += attn.o_proj(x)
            del attn_inputs
            h_mlp = hessian_of(layer.post_attention_layernorm(hidden[rows]) for rows in batches)
        quantize(("mlp.gate_proj", "mlp.up_proj"), dict.fromkeys(("mlp.gate_proj", "mlp.up_proj"), h_mlp))
        del h_mlp
        with torch.inference_mode():
            inner = []
            for rows in batches:
                x = layer.post_attention_layernorm(hidden[rows])
                inner.append(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
            h_down = hessian_of(inner)
        quantize(("mlp.down_proj",), {"mlp.down_proj": h_down})
        del h_down
        with torch.inference_mode():
            for rows, x in zip(batches, inner, strict=True):
                hidden[rows] += mlp.down_proj(x)
