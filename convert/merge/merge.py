"""Streaming merge driver: base checkpoint + PEFT adapters -> merged safetensors checkpoint.

Each output tensor is computed on its own: the base tensor is read from the memory map,
widened to float32, run through its steps (replacements, LoRA/DoRA updates of each
adapter in order), rounded to the output dtype and written. Nothing is written before the
whole plan has been validated, and the output directory appears only when complete.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantmill import __version__
from quantmill.atomic import atomic_dir, refuse_unrelated_dir
from quantmill.convert.merge import bnb
from quantmill.convert.merge.adapter import CONFIG_NAME as ADAPTER_CONFIG
from quantmill.convert.merge.adapter import Adapter, load_adapter
from quantmill.convert.merge.lora import merged_weight
from quantmill.convert.merge.plan import MergePlan, Replace, TensorPlan, build_plan
from quantmill.convert.safetensors_io import FLOAT_CODES, FLOAT_DTYPES, OutputTensor, encode_float, write_checkpoint
from quantmill.errors import InputFileError, UnsupportedError, UserInputError
from quantmill.hashing import sha256_file
from quantmill.jsonio import read_json_object

if TYPE_CHECKING:
    import torch

    from quantmill.convert.safetensors_io import Checkpoint

METADATA_NAME = "quantmill_merge.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "spiece.model",
    "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
BASE_FILES = ("generation_config.json", "LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE", "USE_POLICY.md")
DTYPE_OF_CODE = {code: name for name, code in FLOAT_CODES.items()}


@dataclass
class MergeResult:
    out_dir: Path
    files: list[str]
    warnings: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)


class _Base:
    """The base checkpoint: plain tensors plus, for a 4-bit base, packed weights to dequantize."""

    def __init__(self, ckpt: Checkpoint, quantized: dict[str, str]) -> None:
        self.ckpt = ckpt
        self.quantized = quantized
        self.states = {w: bnb.quant_state(ckpt, w, q) for w, q in quantized.items()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {n: e.shape for n, e in self.ckpt.entries.items() if n not in self.quantized and not bnb.is_companion(n, self.quantized)}
        shapes.update({w: tuple(int(d) for d in s["shape"]) for w, s in self.states.items()})
        return shapes

    def dtype_code(self, name: str) -> str:
        if name in self.quantized:
            return FLOAT_CODES.get(str(self.states[name].get("dtype")), "F16")
        return self.ckpt.entries[name].dtype

    def float32(self, name: str) -> torch.Tensor:
        import torch

        from quantmill.convert.safetensors_io import to_float32

        if name in self.quantized:
            return bnb.dequantize_4bit(self.ckpt, name, self.quantized[name])[0]
        values = torch.from_numpy(to_float32(self.ckpt.array(name), self.ckpt.entries[name].dtype).copy())
        self.ckpt.release(name)
        return values

    def comparable(self, name: str) -> torch.Tensor | None:
        return None if name in self.quantized else self.float32(name)


def _name_candidates(base_dir: Path, config: dict[str, Any], adapters: list[Adapter]) -> list[str]:
    names = [str(config.get("_name_or_path") or "")] + [str(a.config.get("base_model_name_or_path") or "") for a in adapters]
    for part in base_dir.resolve().parts:  # a Hub cache path: .../models--org--name/snapshots/<rev>
        if part.startswith("models--"):
            names.append(part.removeprefix("models--").replace("--", "/"))
    names.append(f"unsloth/{base_dir.resolve().name}")
    return [n for n in names if n]


def _check_4bit(base_dir: Path, config: dict[str, Any], ckpt: Checkpoint, adapters: list[Adapter], dequantize: bool) -> dict[str, str]:
    names = list(ckpt.entries)
    if not bnb.is_bnb_4bit(config, names):
        return {}
    if not dequantize:
        raise UnsupportedError(
            f"{base_dir}: is a bitsandbytes 4-bit checkpoint, and merging into its dequantized weights bakes the 4-bit rounding"
            f" error into the merged model; merge into {bnb.describe_original(_name_candidates(base_dir, config, adapters))}"
            " instead, or pass --dequantize-4bit-base to merge into the dequantized weights anyway"
        )
    quantized = bnb.quantized_weights(names)
    if not quantized:
        raise InputFileError(base_dir, "config.json declares 4-bit quantization but no packed 4-bit weights were found", "re-download the checkpoint")
    return quantized


def _output_tensors(plan: MergePlan, base: _Base, dtype: str | None) -> list[OutputTensor]:
    out: list[OutputTensor] = []
    for tp in plan.tensors.values():
        code = base.dtype_code(tp.source)
        if code not in FLOAT_DTYPES:
            if tp.steps:
                raise UnsupportedError(f"base tensor {tp.source!r} has dtype {code}; an adapter can only change floating-point tensors")
        elif dtype is not None:
            code = FLOAT_CODES[dtype]
        elif code == "F64":
            code = "F32"
        out.append(OutputTensor(tp.name, tp.shape, code))
    return out


def _compute(tp: TensorPlan, base: _Base, adapters: list[Adapter]) -> torch.Tensor:
    import torch

    values = base.float32(tp.source)
    for step in tp.steps:
        adapter = adapters[step.adapter]
        src = adapter.source
        if isinstance(step, Replace):
            values = src.float32(step.tensor)
            continue
        module = step.module
        scaling = module.scaling * adapter.weight
        if step.part == "bias":
            assert module.b_bias is not None
            values = values + src.float32(module.b_bias) * scaling
        else:
            magnitude = src.float32(module.magnitude) if module.magnitude else None
            values = merged_weight(values, src.float32(module.a), src.float32(module.b), scaling, module.kind, module.fan_in_fan_out, magnitude)
    if tp.steps and not bool(torch.isfinite(values).all()):
        names = sorted({str(adapters[s.adapter].weights_file) for s in tp.steps})
        raise UserInputError(f"merged tensor {tp.name!r} has NaN or infinite values; the adapter {', '.join(names)} seems broken")
    return values


def _produce(tensor: OutputTensor, tp: TensorPlan, base: _Base, adapters: list[Adapter]) -> bytes:
    if not tp.steps and tp.source not in base.quantized and base.ckpt.entries[tp.source].dtype == tensor.dtype:
        data = base.ckpt.array(tp.source).tobytes()  # untouched: copy the stored bytes
        base.ckpt.release(tp.source)
        return data
    return encode_float(_compute(tp, base, adapters), tensor.dtype)


def _merged_config(config: dict[str, Any], plan: MergePlan, dtype: str | None, dequantized: bool) -> dict[str, Any] | None:
    """config.json changes, or None when the base's file is copied byte for byte."""
    changes: dict[str, Any] = {}
    if plan.vocab_rows is not None and config.get("vocab_size") != plan.vocab_rows:
        changes["vocab_size"] = plan.vocab_rows
    if plan.tied is not None and not plan.tied.kept:
        changes["tie_word_embeddings"] = False
    if dtype is not None:
        for key in ("dtype", "torch_dtype"):
            if key in config and config[key] != dtype:
                changes[key] = dtype
    if not changes and not dequantized:
        return None
    merged = {**config, **changes}
    if dequantized:
        merged.pop("quantization_config", None)
    return merged


def _tokenizer_source(base_dir: Path, adapters: list[Adapter]) -> tuple[Path, str]:
    for adapter in reversed(adapters):
        if any((adapter.path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            return adapter.path, adapter.path.name
    return base_dir, "base"


def _copy_files(base_dir: Path, tmp: Path, config: dict[str, Any], adapters: list[Adapter]) -> str:
    names = list(BASE_FILES)
    if config.get("auto_map"):  # custom architectures keep their (never executed here) code files
        names += sorted(p.name for p in base_dir.glob("*.py"))
    for name in names:
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, tmp / name)
    tok_dir, tok_from = _tokenizer_source(base_dir, adapters)
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copyfile(tok_dir / name, tmp / name)
    return tok_from


def _adapter_record(adapter: Adapter, plan: MergePlan, index: int) -> dict[str, Any]:
    replaced = sorted({tp.name for tp in plan.tensors.values() for s in tp.steps if isinstance(s, Replace) and s.adapter == index})
    files = {p.name: sha256_file(p) for p in (adapter.path / ADAPTER_CONFIG, adapter.weights_file)}
    return {
        "name": adapter.path.resolve().name,
        "weight": adapter.weight,
        "method": "dora" if adapter.use_dora else "lora",
        "use_rslora": adapter.use_rslora,
        "lora_modules": len(adapter.modules),
        "replaced_tensors": replaced,
        "files": files,
        "base_model_name_or_path": adapter.config.get("base_model_name_or_path"),
    }


def _progress(enabled: bool) -> Callable[[Iterable[OutputTensor]], Iterable[OutputTensor]]:
    def wrap(items: Iterable[OutputTensor]) -> Iterable[OutputTensor]:
        from tqdm import tqdm

        return tqdm(items, desc="merge", unit="tensor", disable=not enabled, leave=False)

    return wrap


def _check_target_modules(adapter: Adapter, base_tensors: Mapping[str, object]) -> None:
    """Refuse an adapter whose ``target_modules`` match no module of the base model (as PEFT does)."""
    import re

    targets = adapter.config.get("target_modules")
    if targets is None or targets == "all-linear":
        return
    modules = {name.rsplit(".", 1)[0] for name in base_tensors if name.endswith(".weight")}
    if isinstance(targets, str):
        try:
            matched = any(re.fullmatch(targets, m) for m in modules)
        except re.error as exc:
            raise InputFileError(adapter.path / "adapter_config.json", f"target_modules {targets!r} is not a regular expression"
                                 f" ({exc})", "fix adapter_config.json") from exc
        unmatched = [] if matched else [targets]
    elif isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        found = {t for t in targets if any(m == t or m.endswith("." + t) for m in modules)}
        unmatched = [] if found else list(targets)
    else:
        raise InputFileError(adapter.path / "adapter_config.json", f"target_modules is {targets!r}, expected a list of"
                             " module names or a regular expression", "fix adapter_config.json")
    if unmatched:
        raise InputFileError(adapter.path / "adapter_config.json", f"target_modules {unmatched} match no module of the base"
                             " model", "pass the adapter trained for this base model")


def merge_adapters(
    base_dir: str | Path,
    adapters: Sequence[tuple[str | Path, float]],
    out_dir: str | Path,
    dtype: str | None = None,
    *,
    allow_pickle: bool = False,
    dequantize_4bit_base: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> MergeResult:
    """Merge ``adapters`` ((folder, weight) pairs, applied in order) into ``base_dir``; write ``out_dir``."""
    from quantmill.convert.safetensors_io import Checkpoint

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if dtype is not None and dtype not in FLOAT_CODES:
        raise UserInputError(f"--dtype {dtype!r} is not one of {', '.join(FLOAT_CODES)}; pick one of them")
    if not adapters:
        raise UserInputError("no adapter given; pass --adapter DIR at least once")
    if out_dir.resolve() == base_dir.resolve() or any(out_dir.resolve() == Path(a).resolve() for a, _ in adapters):
        raise UserInputError(f"--out {out_dir} is an input directory; choose a new output directory")
    refuse_unrelated_dir(out_dir, METADATA_NAME, "merge", (base_dir, *(Path(a) for a, _ in adapters)))
    config = read_json_object(base_dir / "config.json", "pass a Hugging Face model directory with its config.json")
    with contextlib.ExitStack() as stack:
        ckpt = stack.enter_context(Checkpoint(base_dir))
        loaded: list[Adapter] = []
        for path, weight in adapters:
            adapter = load_adapter(path, weight, allow_pickle=allow_pickle, base_model_type=config.get("model_type"))
            stack.callback(adapter.close)
            _check_target_modules(adapter, ckpt.entries)
            loaded.append(adapter)
        quantized = _check_4bit(base_dir, config, ckpt, loaded, dequantize_4bit_base)
        base = _Base(ckpt, quantized)
        plan = build_plan(base.shapes(), config, loaded, base.comparable)
        warnings = list(plan.warnings)
        if quantized:
            warnings.insert(
                0,
                f"merged into the dequantized weights of a bitsandbytes 4-bit base ({len(quantized)} weights);"
                " the 4-bit rounding error is part of this model",
            )
        for i, adapter in enumerate(loaded):
            if adapter.weight != 1.0 and any(isinstance(s, Replace) and s.adapter == i for tp in plan.tensors.values() for s in tp.steps):
                warnings.append(
                    f"{adapter.path.name}: weight {adapter.weight} scales its LoRA updates only; its saved full tensors replace the base as they are"
                )
        outputs = _output_tensors(plan, base, dtype)
        new_config = _merged_config(config, plan, dtype, bool(quantized))
        out_dtype = dtype or sorted({DTYPE_OF_CODE.get(t.dtype, t.dtype) for t in outputs if t.dtype in DTYPE_OF_CODE} or {"float32"})[0]
        with atomic_dir(out_dir) as tmp:
            files = write_checkpoint(
                tmp, outputs, lambda t: _produce(t, plan.tensors[t.name], base, loaded), max_shard_bytes, _progress(progress)
            )
            if new_config is None:
                shutil.copyfile(base_dir / "config.json", tmp / "config.json")
            else:
                (tmp / "config.json").write_text(json.dumps(new_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            tokenizer_from = _copy_files(base_dir, tmp, config, loaded)
            metadata = {
                "format": 1,
                "quantmill_version": __version__,
                "base": {"name": base_dir.resolve().name, "config_sha256": sha256_file(base_dir / "config.json")},
                "adapters": [_adapter_record(a, plan, i) for i, a in enumerate(loaded)],
                "semantics": "adapters applied in order; weight multiplies each adapter's LoRA scale; saved full tensors replace",
                "dtype": out_dtype,
                "files": files,
                "tied_embeddings": None if plan.tied is None else ("kept" if plan.tied.kept else "untied"),
                "vocab_size": plan.vocab_rows,
                "tokenizer_from": tokenizer_from,
                "dequantized_4bit_base": bool(quantized),
                "warnings": warnings,
            }
            (tmp / METADATA_NAME).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return MergeResult(out_dir, files, warnings, metadata)

