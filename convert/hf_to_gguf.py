"""Hugging Face safetensors checkpoint → GGUF (f32, f16, bf16, q8_0), streamed.

The conversion is planned first from the safetensors headers alone (names, shapes,
output types, byte sizes), so the GGUF header, metadata and tensor table can be
written before any weight is read. Then each tensor is read from the memory map in
row chunks, permuted / cast / quantized chunk by chunk and written to its place in the
file (:mod:`quantmill.convert.tensor_stream`), and its pages are dropped from memory:
peak memory is bounded by a few chunks, not by the model. Output goes to a temporary
directory next to the target and is renamed into place only when complete; with
``split_max_size`` it is split in llama.cpp's format (``split.*`` keys,
``-00001-of-0000N.gguf`` names).

The tensor bytes are those llama.cpp's ``convert_hf_to_gguf.py`` writes for the same
checkpoint (same casts, same ``gguf.quants`` quantization, same tensor order), and
the metadata keys agree with it key by key.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from quantmill.atomic import ensure_writable_dir, temporary_next_to
from quantmill.convert.arch import Architecture, HParams, resolve
from quantmill.convert.arch.tensors import check_tensors
from quantmill.convert.naming import ModelNaming, size_label
from quantmill.convert.safetensors_io import FLOAT_DTYPES, Checkpoint
from quantmill.convert.tensor_stream import PlannedTensor, write_tensor_data
from quantmill.convert.vocab import load_vocab, write_vocab
from quantmill.errors import InputFileError, OutputError, UnsupportedError, UserInputError
from quantmill.jsonio import read_json_object
from quantmill.outputs import check_output, gguf_signature, write_error

Q = gguf.GGMLQuantizationType
# --outtype -> (file type recorded in the GGUF, tensor type of the big matrices)
OUTTYPES: dict[str, tuple[gguf.LlamaFileType, Q]] = {
    "f32": (gguf.LlamaFileType.ALL_F32, Q.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, Q.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, Q.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
}
SIZE_UNITS = {"K": 1000, "M": 1000**2, "G": 1000**3}


def parse_split_size(text: str) -> int:
    """``500M`` / ``2G`` / ``1500K`` / ``123`` → bytes (decimal units, as llama.cpp)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)\s*", text.upper())
    if not match or int(match.group(1)) <= 0:
        raise UserInputError(f"--split-max-size {text!r} is not a size; use a positive number with an optional K, M or G suffix")
    return int(match.group(1)) * SIZE_UNITS.get(match.group(2), 1)


def _tensor_qtype(name: str, shape: tuple[int, ...], wanted: Q) -> Q:
    """llama.cpp's rule: vectors, norms and non-weights stay F32; Q8_0 needs rows of whole blocks."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    if shape[-1] % block:
        return Q.F16
    return wanted


def _nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape, dtype=np.int64))
    return n // block * type_size


def plan_tensors(ckpt: Checkpoint, arch: Architecture, hp: HParams, wanted: Q) -> list[PlannedTensor]:
    """Every GGUF tensor in llama.cpp's order: generated ones first, then the checkpoint's."""
    name_map = arch.tensor_name_map(hp)
    plan = [
        PlannedTensor(gguf.TENSOR_NAMES[kind] + ".weight", data.shape, Q.F32, data.nbytes, data=data)
        for kind, data in arch.extra_tensors(hp)
    ]
    for name, entry in ckpt.entries.items():
        if name.endswith(arch.skip_suffixes):
            continue
        mapped = name_map.get_type_and_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise UnsupportedError(
                f"{entry.file}: tensor {name!r} has no GGUF name for architecture {arch.gguf_name}; this checkpoint"
                " layout is not supported"
            )
        kind, gguf_name = mapped
        if entry.dtype not in FLOAT_DTYPES:
            raise UnsupportedError(f"{entry.file}: tensor {name!r} is {entry.dtype}; only F64/F32/F16/BF16 weights are supported")
        qtype = _tensor_qtype(gguf_name, entry.shape, wanted)
        transform = arch.row_transforms.get(kind.name)
        order = transform(hp, entry.shape) if transform is not None else None
        plan.append(PlannedTensor(gguf_name, entry.shape, qtype, _nbytes(entry.shape, qtype), entry=entry, row_order=order))
    return plan


def _load_config(model_dir: Path) -> dict[str, Any]:
    if not model_dir.is_dir():
        raise InputFileError(model_dir, "no such model directory", "pass the directory that holds config.json and the safetensors files")
    path = model_dir / "config.json"
    if not path.is_file():
        raise InputFileError(path, "missing", "pass a Hugging Face model directory (config.json, *.safetensors, tokenizer files)")
    return read_json_object(path, "fix config.json (it must be a JSON object)")


def _embedding_rows(plan: list[PlannedTensor], model_dir: Path) -> int:
    embd = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
    for t in plan:
        if t.name == embd:
            return t.shape[0]
    raise InputFileError(model_dir, "has no token embedding tensor (model.embed_tokens.weight)", "check that every shard is present")


def _metadata(model_dir: Path, writer: gguf.GGUFWriter) -> gguf.Metadata:
    total, shared, expert, count = writer.get_total_parameter_count()
    meta = gguf.Metadata.load(None, model_dir, None, total)
    # llama.cpp's own gguf-py also takes HF's repetition_penalty as the sampling penalty.
    gen = _generation_config(model_dir / "generation_config.json")
    if "penalty_repeat" not in gen and "repetition_penalty" in gen:
        meta.sampling_penalty_repeat = gen["repetition_penalty"]
    if meta.name is None:
        meta.name = model_dir.name
    if meta.size_label is None and total > 0:
        meta.size_label = size_label(total, shared, expert, count)
    return meta


def _generation_config(path: Path) -> dict[str, Any]:
    """generation_config.json as llama.cpp reads it: unreadable means empty."""
    try:
        return read_json_object(path, "") if path.is_file() else {}
    except InputFileError:
        return {}


def output_path(model_dir: Path, outfile: Path | None, naming: ModelNaming, outtype: str) -> Path:
    """The GGUF path: the standard name in MODEL_DIR (or in ``outfile`` if it is a directory),
    else ``outfile`` with ``{ftype}``/``{outtype}`` filled in."""
    output_type = OUTTYPES[outtype][0].name.partition("_")[2]
    if outfile is None or outfile.is_dir():
        return (outfile or model_dir) / naming.file_name(output_type)
    name = outfile.name
    if "{" in name:
        low, up = output_type.lower(), output_type.upper()
        try:
            name = name.format(low, ftype=low, outtype=low, FTYPE=up, OUTTYPE=up)
        except (IndexError, KeyError, ValueError) as exc:
            raise UserInputError(f"--outfile {outfile}: bad template ({exc}); use {{ftype}} or {{outtype}}") from exc
    return outfile.with_name(name)


def convert_hf_to_gguf(
    model_dir: Path | str,
    outtype: str,
    outfile: Path | str | None = None,
    split_max_size: int | None = None,
    *,
    vocab_pre: str | None = None,
    threads: int = 2,
    progress: bool = True,
) -> list[Path]:
    """Convert the HF checkpoint in ``model_dir`` to GGUF; return the written file(s).

    ``outtype`` is one of f32, f16, bf16, q8_0. ``split_max_size`` (bytes of tensor data
    per file) splits the output in llama.cpp's split format. ``vocab_pre`` names the
    llama.cpp BPE pre-tokenizer when the tokenizer's probe hash is not a known one.
    ``threads`` encode tensor chunks in parallel (the output does not depend on it).
    """
    if outtype not in OUTTYPES:
        raise UserInputError(f"--outtype {outtype!r} is not supported; use one of {', '.join(OUTTYPES)}")
    if split_max_size is not None and split_max_size <= 0:
        raise UserInputError(f"split_max_size {split_max_size} must be a positive number of bytes")
    model_dir = Path(os.path.abspath(model_dir))
    if outfile is not None:
        outfile = Path(outfile)
        if os.path.islink(outfile):
            raise OutputError(f"--outfile {outfile}: is a symbolic link (to {os.readlink(outfile)}); "
                              "give a real path or a new name")
        if not outfile.is_dir() and "{" not in outfile.name:
            _check_outfile(outfile, model_dir)
    config = _load_config(model_dir)
    _, arch = resolve(config, model_dir / "config.json")
    arch.require("convert", model_dir / "config.json")
    hp = arch.read_hparams(config, model_dir / "config.json")
    file_type, wanted = OUTTYPES[outtype]
    with Checkpoint(model_dir) as ckpt:
        arch.check_checkpoint(hp, set(ckpt.entries), model_dir)
        check_tensors(arch, hp, ckpt.entries, model_dir)
        plan = plan_tensors(ckpt, arch, hp, wanted)
        rows = _embedding_rows(plan, model_dir)
        if rows != hp["vocab_size"]:
            raise InputFileError(
                model_dir / "config.json", f"vocab_size is {hp['vocab_size']} but the token embedding has {rows} rows", "fix vocab_size"
            )
        vocab = load_vocab(model_dir, hp["vocab_size"], rows, vocab_pre, arch.vocab_kinds)

        writer = gguf.GGUFWriter(path=None, arch=arch.gguf_name, split_max_size=split_max_size or 0)
        for t in plan:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        if len(writer.tensors) == 1:
            writer.split_max_size = 0  # everything fits one file: write it unsplit, as llama.cpp does
        meta = _metadata(model_dir, writer)
        writer.add_type(gguf.GGUFType.MODEL)
        meta.set_gguf_meta_model(writer)
        arch.write_hparams(writer, hp, file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_vocab(writer, vocab)
        arch.adjust_vocab_keys(writer, hp)

        naming = ModelNaming(meta.name, meta.basename, meta.size_label, meta.finetune, meta.version)
        final = output_path(model_dir, Path(os.path.abspath(outfile)) if outfile is not None else None, naming, outtype)
        _check_outfile(final, model_dir)
        return _write_atomically(writer, ckpt, plan, final, threads, progress)


def _check_outfile(path: Path, model_dir: Path) -> None:
    """The output rule for a GGUF file: never one of the model's files, never a file that is not a GGUF."""
    inputs = [model_dir, *(p for p in model_dir.iterdir() if p.is_file())] if model_dir.is_dir() else [model_dir]
    check_output(path, kind="file", flag="--outfile", command="hf-to-gguf", inputs=inputs, owned=gguf_signature)


def _write_atomically(
    writer: gguf.GGUFWriter, ckpt: Checkpoint, plan: list[PlannedTensor], final: Path, threads: int, progress: bool
) -> list[Path]:
    """Write every file into a staging directory next to ``final``, then rename them into place."""
    ensure_writable_dir(final.parent)
    staging = temporary_next_to(final, directory=True)
    try:
        writer.write_header_to_file(path=staging / final.name)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        write_tensor_data(writer, ckpt, plan, threads=threads, progress=progress)
        writer.close()
        written = sorted(staging.iterdir())
        for path in written:  # split files have their own names: each obeys the output rule too
            _check_outfile(final.parent / path.name, ckpt.model_dir)
        results = []
        for path in written:
            os.replace(path, final.parent / path.name)
            results.append(final.parent / path.name)
        return results
    except OSError as exc:
        raise (write_error(exc, final) or OutputError(
            f"{final}: writing failed ({exc.strerror or exc}); free disk space or choose another location")) from exc
    finally:
        writer.close()
        shutil.rmtree(staging, ignore_errors=True)
