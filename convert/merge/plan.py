"""The merge plan: for every output tensor, where it starts and which adapter steps apply.

Planning reads only headers (plus the few saved full tensors, to tell a frozen copy of the
base from a trained replacement) and checks every shape before anything is written, so an
adapter made for another base fails here with the tensor and adapter file named.

Semantics (documented in the package docstring): adapters apply in order, each to the
result of the previous ones, as if each were loaded with PEFT onto the previous merge,
its scale multiplied by its weight, and merged with ``merge_and_unload``. Saved full
tensors replace the current tensor, except a saved copy equal to the original base tensor,
which changes nothing. Tied input/output embeddings stay tied only while every adapter
changes both alike; otherwise the output embedding gets its own tensor (the merged model
then computes what the adapter computed; PEFT's own merge would add both updates into the
shared tensor).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from quantmill.convert.merge.adapter import Adapter, LoraModule
from quantmill.errors import UserInputError

if TYPE_CHECKING:
    import torch

# base tensor name -> its float32 values, or None where it cannot be compared (a packed 4-bit weight)
BaseLoader = Callable[[str], "torch.Tensor | None"]

# (input embedding module, output embedding module) pairs that transformers ties.
EMBEDDING_PAIRS: tuple[tuple[str, str], ...] = (
    ("model.embed_tokens", "lm_head"),
    ("transformer.wte", "lm_head"),
    ("transformer.word_embeddings", "lm_head"),
    ("model.decoder.embed_tokens", "lm_head"),
    ("gpt_neox.embed_in", "embed_out"),
)


@dataclass(frozen=True)
class Replace:
    adapter: int
    tensor: str  # adapter tensor name


@dataclass(frozen=True)
class ApplyLora:
    adapter: int
    module: LoraModule
    part: str  # "weight" or "bias"


Step = Replace | ApplyLora


@dataclass
class TensorPlan:
    name: str  # output tensor name
    source: str  # base tensor it starts from
    shape: tuple[int, ...]
    steps: list[Step] = field(default_factory=list)


@dataclass
class TiedPair:
    input_weight: str
    output_weight: str
    kept: bool = True


@dataclass
class MergePlan:
    tensors: dict[str, TensorPlan]
    tied: TiedPair | None
    warnings: list[str]
    vocab_rows: int | None


def _mismatch(adapter: Adapter, what: str) -> UserInputError:
    return UserInputError(f"{adapter.weights_file}: {what}; this adapter was trained on a different base model")


def _tied_pair(config: dict[str, Any], names: set[str]) -> TiedPair | None:
    for input_module, output_module in EMBEDDING_PAIRS:
        input_weight, output_weight = f"{input_module}.weight", f"{output_module}.weight"
        if input_weight not in names:
            continue
        if config.get("tie_word_embeddings", output_weight not in names):
            return TiedPair(input_weight, output_weight)
        return None
    return None


def _expected_shape(module: LoraModule, a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, int]:
    if module.kind == "embedding":
        return (a[1], b[0])
    return (a[1], b[0]) if module.fan_in_fan_out else (b[0], a[1])


class _Planner:
    def __init__(self, base_shapes: dict[str, tuple[int, ...]], config: dict[str, Any], adapters: list[Adapter], load_base: BaseLoader) -> None:
        self.adapters = adapters
        self.load_base = load_base
        self.base_names = set(base_shapes)
        self.shapes: dict[str, tuple[int, ...]] = dict(base_shapes)
        self.tied = _tied_pair(config, self.base_names)
        if self.tied is not None:
            self.shapes.setdefault(self.tied.output_weight, self.shapes[self.tied.input_weight])
        self.original_shapes = dict(self.shapes)
        self.steps: dict[str, list[Step]] = {name: [] for name in self.shapes}
        self.warnings: list[str] = []
        self.changed_by: dict[str, int] = {}

    def base_source(self, name: str) -> str:
        """Tied output embeddings start from the input embedding (transformers ties them on load)."""
        if self.tied is not None and name == self.tied.output_weight:
            return self.tied.input_weight
        return name

    def is_frozen_copy(self, index: int, target: str, tensor: str) -> bool:
        import torch

        adapter = self.adapters[index]
        if adapter.source.shape(tensor) != self.original_shapes[target]:
            return False
        original = self.load_base(self.base_source(target))
        return original is not None and bool(torch.equal(original, adapter.source.float32(tensor)))

    def plan_replacements(self, index: int) -> None:
        adapter = self.adapters[index]
        for target, tensor in sorted(adapter.replacements.items()):
            if target not in self.shapes:
                raise _mismatch(adapter, f"tensor {tensor!r} replaces {target!r}, which the base model does not have")
            shape, current = adapter.source.shape(tensor), self.shapes[target]
            if shape != current and not self._is_vocab_resize(target, shape, current):
                raise _mismatch(adapter, f"tensor {tensor!r} has shape {list(shape)} but the base tensor {target!r} has {list(current)}")
            if self.is_frozen_copy(index, target, tensor):
                continue
            if target in self.changed_by:
                self.warnings.append(
                    f"{adapter.path.name}: its saved {target} replaces the result of adapter {self.adapters[self.changed_by[target]].path.name}"
                )
            if shape != current:
                self.warnings.append(f"{adapter.path.name}: {target} resized from {current[0]} to {shape[0]} rows (resized vocabulary)")
            self.shapes[target] = shape
            self.steps[target].append(Replace(index, tensor))
            self.changed_by[target] = index

    def _is_vocab_resize(self, target: str, shape: tuple[int, ...], current: tuple[int, ...]) -> bool:
        embedding_weights = {f"{m}.weight" for pair in EMBEDDING_PAIRS for m in pair}
        return target in embedding_weights and len(shape) == 2 and len(current) == 2 and shape[1] == current[1]

    def plan_modules(self, index: int) -> None:
        adapter = self.adapters[index]
        source = adapter.source
        for key, module in adapter.modules.items():
            weight = module.weight_name
            if weight not in self.shapes:
                raise _mismatch(adapter, f"LoRA tensor {module.a!r} targets module {key!r}, which the base model does not have")
            a, b = source.shape(module.a), source.shape(module.b)
            expected = _expected_shape(module, a, b)
            if self.shapes[weight] != expected:
                raise _mismatch(
                    adapter,
                    f"LoRA tensors {module.a!r} {list(a)} and {module.b!r} {list(b)} need a base {weight!r} of shape {list(expected)},"
                    f" found {list(self.shapes[weight])}",
                )
            if module.magnitude is not None and source.shape(module.magnitude) != (b[0],):
                raise _mismatch(adapter, f"DoRA magnitude {module.magnitude!r} has shape {list(source.shape(module.magnitude))}, expected {[b[0]]}")
            self.steps[weight].append(ApplyLora(index, module, "weight"))
            self.changed_by[weight] = index
            if module.b_bias is not None:
                bias = module.bias_name
                if bias not in self.shapes:
                    raise _mismatch(adapter, f"tensor {module.b_bias!r} (lora_bias) needs a bias {bias!r}, which the base model does not have")
                if self.shapes[bias] != (b[0],):
                    raise _mismatch(adapter, f"tensor {module.b_bias!r} has shape {[b[0]]} but the base {bias!r} has {list(self.shapes[bias])}")
                self.steps[bias].append(ApplyLora(index, module, "bias"))
                self.changed_by[bias] = index

    def tie_preserving(self, index: int) -> bool:
        """Whether adapter ``index`` leaves tied input/output embeddings equal to each other."""
        import torch

        assert self.tied is not None
        adapter = self.adapters[index]
        tin, tout = self.tied.input_weight, self.tied.output_weight
        steps_in = [s for s in self.steps[tin] if s.adapter == index]
        steps_out = [s for s in self.steps[tout] if s.adapter == index]
        if not steps_in and not steps_out:
            return True
        rep_in = [s for s in steps_in if isinstance(s, Replace)]
        rep_out = [s for s in steps_out if isinstance(s, Replace)]
        if len(rep_in) != len(rep_out):
            return False
        for r_in, r_out in zip(rep_in, rep_out, strict=True):
            if not torch.equal(adapter.source.float32(r_in.tensor), adapter.source.float32(r_out.tensor)):
                return False
        lora_in = [s.module for s in steps_in if isinstance(s, ApplyLora)]
        lora_out = [s.module for s in steps_out if isinstance(s, ApplyLora)]
        if not lora_in and not lora_out:
            return True
        if not (adapter.ensure_weight_tying and len(lora_in) == len(lora_out) == 1):
            return False
        emb, head = lora_in[0], lora_out[0]
        if emb.kind != "embedding" or head.kind != "linear" or emb.magnitude or head.magnitude or emb.scaling != head.scaling:
            return False
        # PEFT's weight tying: lm_head's A is the embedding's B transposed and vice versa
        src = adapter.source
        return bool(torch.equal(src.float32(head.a), src.float32(emb.b).T) and torch.equal(src.float32(head.b), src.float32(emb.a).T))

    def resolve_tie(self) -> None:
        if self.tied is None:
            return
        tin, tout = self.tied.input_weight, self.tied.output_weight
        self.tied.kept = all(self.tie_preserving(i) for i in range(len(self.adapters)))
        if self.tied.kept:
            self.steps[tout] = list(self.steps[tin])
            self.shapes[tout] = self.shapes[tin]
        else:
            self.warnings.append(
                f"{tin} and {tout} were tied; the adapters change them differently, so the output has its own {tout} and tie_word_embeddings=false"
            )


def build_plan(
    base_shapes: dict[str, tuple[int, ...]], config: dict[str, Any], adapters: list[Adapter], load_base: BaseLoader
) -> MergePlan:
    """Validate every adapter against the base and list the steps of every output tensor.

    ``base_shapes`` maps the base's tensor names to shapes; ``load_base(name)`` returns a
    base tensor as float32 (or None when it cannot be compared, e.g. a 4-bit weight).
    """
    planner = _Planner(base_shapes, config, adapters, load_base)
    for index in range(len(adapters)):
        planner.plan_replacements(index)
        planner.plan_modules(index)
    planner.resolve_tie()
    tensors: dict[str, TensorPlan] = {}
    for name in sorted(planner.shapes):
        if planner.tied is not None and name == planner.tied.output_weight and name not in base_shapes and planner.tied.kept:
            continue  # stays tied: transformers rebuilds it from the input embedding
        tensors[name] = TensorPlan(name, planner.base_source(name), planner.shapes[name], planner.steps[name])
    vocab_rows = None
    for input_module, _ in EMBEDDING_PAIRS:
        weight = f"{input_module}.weight"
        if weight in planner.shapes and planner.shapes[weight] != planner.original_shapes[weight]:
            vocab_rows = planner.shapes[weight][0]
    return MergePlan(tensors, planner.tied, planner.warnings, vocab_rows)
