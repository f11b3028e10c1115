"""How one decoder layer is walked for GPTQ: where each group's inputs come from, what is recomputed.

A flow calls ``quantize(names, hessians)`` once per true-sequential group, with XᵀX of the
inputs of those linears over the branch's hidden states (linears fed the same tensor share one
Hessian), and leaves the layer's outputs in ``hidden``. The architecture record's decoder spec
names its flow (``flow`` and, for the pre-norm walk, its ``pre_norm`` layout); the engine picks it:

* ``PreNormFlow`` (the llama family and Qwen): the layer is
  ``h' = h + attn(norm1(h))``, ``out = h' + mlp(norm2(h'))``, so nothing is computed twice:
  q/k/v read ``norm1(h)``; o_proj's inputs are computed once with the quantized q/k/v and kept;
  ``h'`` is then formed in place with the quantized o_proj; gate/up read ``norm2(h')``;
  down_proj's inputs are computed once with the quantized gate/up (and kept when they fit
  ``KEEP_BYTES``, else recomputed); the output is ``h' + down(...)``.
* ``GenericFlow`` (Falcon's parallel layer, any other): per group the layer runs until that group's inputs have
  been seen (the rest of the forward is skipped), then once more, whole, for its outputs.
  Without true-sequential, one forward collects every group's inputs from the float layer.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import torch
    from torch import nn

    from quantmill.convert.arch.base import PreNormLayout
    from quantmill.quantize.gptq.hessian import BlockedHessian as Hessian
    from quantmill.quantize.layerwise import Batches, LayerwiseRunner

QuantizeGroup = Callable[[Sequence[str], dict[str, "Hessian"]], None]


class _StopForward(Exception):
    """Raised by a hook once every input it waits for has been seen: the rest of the forward is skipped."""


def _batches(hidden: torch.Tensor, runner: LayerwiseRunner) -> Batches:
    return runner.batches(hidden.shape[0])


def _new_hessian(width: int, device: torch.device) -> Hessian:
    from quantmill.quantize.gptq.hessian import BlockedHessian

    return BlockedHessian.create(width, device)


def hessian_of(inputs: Iterable[torch.Tensor]) -> Hessian:
    """XᵀX over a sequence of input batches (the inputs of one linear, or of linears sharing them), in order."""
    hessian: Hessian | None = None
    for x in inputs:
        hessian = hessian or _new_hessian(x.shape[-1], x.device)
        _add(hessian, x)
    assert hessian is not None
    return hessian


def _add(hessian: Hessian, x: torch.Tensor) -> None:
    hessian.add(x.reshape(-1, x.shape[-1]))


class StatelessFlow:
    """A flow that carries nothing from one layer to the next but the hidden states."""

    def state(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the flow keeps for the branch of stream ``hidden`` across layers (for a layer checkpoint)."""
        return {}

    def restore(self, hidden: torch.Tensor, arrays: dict[str, torch.Tensor]) -> None:
        """Take back :meth:`state` for the branch now streaming through ``hidden``."""


class GenericFlow(StatelessFlow):
    """Any decoder layer, through forward pre-hooks on its linears."""

    def __init__(self, groups: tuple[tuple[str, ...], ...]) -> None:
        self.groups = groups

    def run(self, layer: nn.Module, hidden: torch.Tensor, runner: LayerwiseRunner, quantize: QuantizeGroup, true_sequential: bool) -> None:
        if true_sequential:
            for group in self.groups:
                quantize(group, self.group_hessians(layer, group, hidden, runner))
        else:
            names = tuple(name for group in self.groups for name in group)
            hessians = self.group_hessians(layer, names, hidden, runner)
            for group in self.groups:
                quantize(group, {name: hessians[name] for name in group})
        self.advance(layer, hidden, runner)

    @staticmethod
    def group_hessians(layer: nn.Module, names: Sequence[str], hidden: torch.Tensor, runner: LayerwiseRunner) -> dict[str, Hessian]:
        import torch

        found: dict[str, Hessian] = {}
        batch_inputs: list[tuple[torch.Tensor, Hessian]] = []
        pending: set[str] = set()

        def make_hook(name: str) -> Any:
            def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
                x = args[0]
                hessian = next((h for seen, h in batch_inputs if seen is x), None)
                if hessian is None:
                    hessian = found.get(name) or _new_hessian(x.shape[-1], x.device)
                    _add(hessian, x)
                    batch_inputs.append((x, hessian))
                found.setdefault(name, hessian)
                pending.discard(name)
                if not pending:
                    raise _StopForward

            return hook

        handles = [layer.get_submodule(name).register_forward_pre_hook(make_hook(name)) for name in names]
        try:
            with torch.inference_mode():
                for rows in _batches(hidden, runner):
                    batch = hidden[rows]
                    batch_inputs.clear()
                    pending.update(names)
                    try:
                        runner.forward_layer(layer, batch)
                    except _StopForward:
                        continue
                    raise RuntimeError(f"decoder layer never called {sorted(pending)}; this is a quantmill bug")
        finally:
            for handle in handles:
                handle.remove()
            batch_inputs.clear()
        return found

    @staticmethod
    def advance(layer: nn.Module, hidden: torch.Tensor, runner: LayerwiseRunner) -> None:
        import torch

        with torch.inference_mode():
            for rows in _batches(hidden, runner):
                batch = hidden[rows]
                batch.copy_(runner.forward_layer(layer, batch))


def _capture_input(target: nn.Module, call: Callable[[], Any]) -> torch.Tensor:
    """The input ``target`` receives while ``call()`` runs; the rest of ``call`` is skipped."""
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured.append(args[0])
        raise _StopForward

    handle = target.register_forward_pre_hook(hook)
    try:
        call()
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("a decoder sub-module never reached the linear it feeds; this is a quantmill bug")
    return captured[0]


class PreNormFlow(StatelessFlow):
    """A pre-norm residual layer walked piece by piece (see the module docstring)."""

    def __init__(self, layout: PreNormLayout) -> None:
        self.layout = layout

    def run(self, layer: nn.Module, hidden: torch.Tensor, runner: LayerwiseRunner, quantize: QuantizeGroup, true_sequential: bool) -> None:
        import torch

        if not true_sequential:
            GenericFlow(self.groups()).run(layer, hidden, runner, quantize, true_sequential)
            return
        lay = self.layout
        attn_norm, attn, attn_out = (layer.get_submodule(n) for n in (lay.attn_norm, lay.attn, lay.attn_out))
        mlp_norm, mlp, mlp_out = (layer.get_submodule(n) for n in (lay.mlp_norm, lay.mlp, lay.mlp_out))
        batches = _batches(hidden, runner)
        with torch.inference_mode():
            h_in = hessian_of(attn_norm(hidden[rows]) for rows in batches)
        quantize(lay.attn_in, dict.fromkeys(lay.attn_in, h_in))
        del h_in
        attn_inputs = runner.new_stream("attn-inputs", (*hidden.shape[:2], cast("nn.Linear", attn_out).in_features))
        with torch.inference_mode():
            for rows in batches:
                attn_inputs[rows] = _capture_input(attn_out, partial(lambda r: attn(
                    hidden_states=attn_norm(hidden[r]), attention_mask=None,
                    position_embeddings=runner.position_embeddings(r.stop - r.start)), rows))
            h_out = hessian_of(attn_inputs[rows] for rows in batches)
        quantize((lay.attn_out,), {lay.attn_out: h_out})
        del h_out
        with torch.inference_mode():
            for rows in batches:
                hidden[rows] += attn_out(attn_inputs[rows])  # h' = h + attn(norm1(h)), with the quantized o_proj
            del attn_inputs
            runner.drop_stream("attn-inputs")
            h_mlp = hessian_of(mlp_norm(hidden[rows]) for rows in batches)
        quantize(lay.mlp_in, dict.fromkeys(lay.mlp_in, h_mlp))
        del h_mlp
        keep = hidden[..., :1].numel() * cast("nn.Linear", mlp_out).in_features * hidden.element_size() <= runner.keep_bytes
        with torch.inference_mode():
            kept: list[torch.Tensor] = []
            h_down: Hessian | None = None
            for rows in batches:
                x = _capture_input(mlp_out, partial(lambda r: mlp(mlp_norm(hidden[r])), rows))
                h_down = h_down or _new_hessian(x.shape[-1], hidden.device)
                _add(h_down, x)
                if keep:
                    kept.append(x)
        assert h_down is not None
        quantize((lay.mlp_out,), {lay.mlp_out: h_down})
        del h_down
        with torch.inference_mode():
            for i, rows in enumerate(batches):
                hidden[rows] += mlp_out(kept[i]) if keep else mlp(mlp_norm(hidden[rows]))

    def groups(self) -> tuple[tuple[str, ...], ...]:
        return self.layout.groups


Flow = GenericFlow | PreNormFlow
