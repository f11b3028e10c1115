"""Split a GGUF file into llama.cpp's split format (``NAME-00001-of-0000N.gguf``, ``split.*`` keys).

The metadata and tensor bytes are copied unchanged (gguf-py's reader and writer); every shard holds
whole tensors and at most ``max_bytes`` of tensor data, the first shard also holds the metadata.
llama.cpp (and llama-cpp-python) load the set from its first shard. Shards are cached under a
directory named by the file's sha256 and the limit, so a repeated publish splits nothing again.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from quantmill.atomic import ensure_writable_dir, temporary_next_to
from quantmill.errors import UserInputError
from quantmill.pipeline.plan import sha256_file

METADATA_ALLOWANCE = 32 * 2**20  # room for the header and metadata of the first shard


def split_gguf(path: Path, out_root: Path, max_bytes: int) -> list[Path]:
    """Shards of ``path`` with at most ``max_bytes`` per file (approximately: tensor data + metadata)."""
    import gguf

    limit = max(max_bytes - METADATA_ALLOWANCE, max_bytes // 2)
    key = hashlib.sha256(f"{sha256_file(path)}:{limit}".encode()).hexdigest()[:16]
    final = out_root / key
    if final.is_dir():
        return sorted(final.glob("*.gguf"))
    ensure_writable_dir(out_root)
    reader = gguf.GGUFReader(path, "r")
    if max(t.n_bytes for t in reader.tensors) > limit:
        raise UserInputError(f"{path}: a tensor is larger than the file limit {max_bytes} bytes; raise max_file_size")
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(None, arch, split_max_size=limit)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith(("GGUF.", "split.")):
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
    staging = temporary_next_to(final, directory=True)
    try:
        writer.write_header_to_file(path=staging / path.name)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in reader.tensors:
            writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
        writer.close()
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sorted(final.glob("*.gguf"))
