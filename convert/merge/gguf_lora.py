"""Export a PEFT LoRA adapter as a llama.cpp GGUF LoRA.

The file llama.cpp loads (``llama_adapter_lora_init``) has ``general.type = adapter``,
``adapter.type = lora``, a float32 ``adapter.lora.alpha`` and, per base tensor ``T``
(its GGUF name), ``T.lora_a`` and ``T.lora_b``. For a linear layer ``lora_a`` is A
(r × in) and ``lora_b`` is B (out × r), stored as-is (GGUF lists dims reversed); for the
token embedding ``lora_a`` is Aᵀ (vocab × r) and ``lora_b`` is B (dim × r). Q and K rows
are permuted the way the base converter permutes the weights, on B's rows.

llama.cpp scales every tensor by alpha / r with one alpha and each tensor's own rank, so
whatever PEFT does differently is folded into B: rsLoRA's alpha/√r (B × √r) and
``alpha_pattern`` entries (B × alphaᵢ/alpha). DoRA, trained full tensors and ``lora_bias``
have no place in a GGUF LoRA: they are refused with the merge as the way out.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantmill.atomic import atomic_file
from quantmill.convert.merge.adapter import Adapter, LoraModule, load_adapter
from quantmill.convert.merge.plan import EMBEDDING_PAIRS, Replace, build_plan
from quantmill.errors import UnsupportedError, UserInputError
from quantmill.jsonio import read_json_object
from quantmill.outputs import check_output, gguf_signature

if TYPE_CHECKING:
    import gguf
    import numpy as np
    import torch

    from quantmill.convert.arch import Architecture

OUTTYPES = ("f32", "f16", "bf16")
MERGE_INSTEAD = "merge it into the base with `quantmill merge` and convert the merged model instead"


def _config(base_dir: Path) -> dict[str, Any]:
    return read_json_object(base_dir / "config.json", "fix config.json",
                            missing_fix="pass the base model's Hugging Face directory as --base")


def _check_exportable(adapter: Adapter, base_dir: Path, config: dict[str, Any]) -> None:
    """Refuse what a GGUF LoRA cannot hold; validate shapes against the base weights when present."""
    if adapter.use_dora:
        raise UnsupportedError(f"{adapter.weights_file}: DoRA adapters cannot be exported as a GGUF LoRA (llama.cpp has no DoRA); {MERGE_INSTEAD}")
    for module in adapter.modules.values():
        if module.b_bias is not None:
            raise UnsupportedError(f"{adapter.weights_file}: tensor {module.b_bias!r} (lora_bias) has no place in a GGUF LoRA; {MERGE_INSTEAD}")
    trained = sorted(set(adapter.replacements) - adapter.frozen_copies)
    if trained:
        raise UnsupportedError(
            f"{adapter.weights_file}: tensor {adapter.replacements[trained[0]]!r} is a trained full tensor (modules_to_save or bias),"
            f" which a GGUF LoRA cannot carry; {MERGE_INSTEAD}"
        )
    embedding_modules = {m for pair in EMBEDDING_PAIRS for m in pair}
    touches_embeddings = any(k in embedding_modules for k in adapter.modules) or any(
        t.removesuffix(".weight") in embedding_modules for t in adapter.replacements
    )
    weights_present = any(base_dir.glob("*.safetensors"))
    if not weights_present:
        if touches_embeddings and config.get("tie_word_embeddings", False):
            raise UnsupportedError(_tied_message(adapter))
        return
    from quantmill.convert.safetensors_io import Checkpoint

    with Checkpoint(base_dir) as ckpt:
        base = {name: entry.shape for name, entry in ckpt.entries.items()}

        def load(name: str) -> torch.Tensor:
            import torch

            from quantmill.convert.safetensors_io import to_float32

            return torch.from_numpy(to_float32(ckpt.array(name), ckpt.entries[name].dtype).copy())

        plan = build_plan(base, config, [adapter], load)
    if any(s for tp in plan.tensors.values() for s in tp.steps if isinstance(s, Replace)):
        raise UnsupportedError(f"{adapter.weights_file}: the adapter replaces base tensors (e.g. a resized vocabulary); {MERGE_INSTEAD}")
    if plan.tied is not None and touches_embeddings:
        raise UnsupportedError(_tied_message(adapter))


def _tied_message(adapter: Adapter) -> str:
    return (
        f"{adapter.weights_file}: LoRA on the embeddings of a model with tied input/output embeddings cannot be exported as a"
        f" GGUF LoRA (llama.cpp reuses token_embd as the output matrix); {MERGE_INSTEAD}"
    )


def _gguf_tensor(module: LoraModule, name_map: gguf.TensorNameMap, adapter: Adapter) -> tuple[gguf.MODEL_TENSOR, str]:
    found = name_map.get_type_and_name(module.weight_name, try_suffixes=(".weight",))
    if found is None:
        raise UnsupportedError(f"{adapter.weights_file}: module {module.key!r} has no GGUF tensor in this architecture; {MERGE_INSTEAD}")
    return found


def lora_factors(
    module: LoraModule, adapter: Adapter, alpha: float, tensor_type: gguf.MODEL_TENSOR, arch: Architecture, hparams: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """(lora_a, lora_b) as float32 numpy arrays in llama.cpp's layout, with the PEFT scale folded into B."""
    import gguf

    a = adapter.source.float32(module.a)
    b = adapter.source.float32(module.b)
    llama_scale = alpha / module.rank if alpha else 1.0
    correction = module.scaling / llama_scale
    if correction != 1.0:
        b = b * correction
    if tensor_type.name in arch.row_transforms:
        perm = arch.row_transforms[tensor_type.name](hparams, (b.shape[0], a.shape[1]))
        b = b[perm]
    if tensor_type == gguf.MODEL_TENSOR.TOKEN_EMBD:
        a = a.T
    return a.contiguous().numpy(), b.contiguous().numpy()


def _add(writer: gguf.GGUFWriter, name: str, values: np.ndarray, outtype: str) -> None:
    import gguf
    import numpy as np

    if outtype == "f32":
        writer.add_tensor(name, values.astype(np.float32))
    elif outtype == "f16":
        writer.add_tensor(name, values.astype(np.float16))
    else:
        qtype = gguf.GGMLQuantizationType.BF16
        writer.add_tensor(name, gguf.quants.quantize(values.astype(np.float32), qtype), raw_dtype=qtype)


def export_lora_gguf(
    adapter_dir: str | Path, base_dir: str | Path, outfile: str | Path, outtype: str = "f32", *, allow_pickle: bool = False
) -> Path:
    """Write the adapter in ``adapter_dir`` as a GGUF LoRA for the base in ``base_dir``; returns ``outfile``."""
    import gguf

    from quantmill.convert.arch import resolve

    if outtype not in OUTTYPES:
        raise UserInputError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}; pick one of them")
    base_dir, outfile = Path(base_dir), Path(outfile)
    inputs = [Path(adapter_dir), base_dir, *(p for d in (Path(adapter_dir), base_dir) if d.is_dir()
                                             for p in d.iterdir() if p.is_file())]
    check_output(outfile, kind="file", flag="--outfile", command="lora-to-gguf", inputs=inputs, owned=gguf_signature)
    config = _config(base_dir)
    _, arch = resolve(config, base_dir / "config.json")
    hparams = arch.read_hparams(config, base_dir / "config.json")
    name_map = arch.tensor_name_map(hparams)
    adapter = load_adapter(adapter_dir, allow_pickle=allow_pickle, base_model_type=config.get("model_type"))
    try:
        _check_exportable(adapter, base_dir, config)
        alpha = float(adapter.config.get("lora_alpha", 8))
        tensors: list[tuple[str, np.ndarray]] = []
        for module in adapter.modules.values():
            tensor_type, name = _gguf_tensor(module, name_map, adapter)
            lora_a, lora_b = lora_factors(module, adapter, alpha, tensor_type, arch, hparams)
            tensors += [(f"{name}.lora_a", lora_a), (f"{name}.lora_b", lora_b)]
        with atomic_file(outfile) as tmp:
            writer = gguf.GGUFWriter(tmp, arch.gguf_name)
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
            writer.add_name(Path(adapter_dir).resolve().name)
            for name, values in tensors:
                _add(writer, name, values, outtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
    finally:
        adapter.close()
    return outfile
