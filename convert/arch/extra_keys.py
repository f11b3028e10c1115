"""Architecture-specific config fields carried into GGUF metadata as typed keys (no runtime reads them).

Python values map to GGUF types as data: bool → BOOL, int → INT64 (UINT32 when the key
asks for it), float → FLOAT64, str → STRING, lists of one of those → ARRAY. ``None``
(JSON null) has no GGUF type: such a field is only in the ``{prefix}.config`` string, which
holds every carried field exactly as config.json has it (sorted JSON), so nothing is lost.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import gguf

V = gguf.GGUFValueType
SCALAR_TYPES: tuple[tuple[type, gguf.GGUFValueType], ...] = ((bool, V.BOOL), (int, V.INT64), (float, V.FLOAT64), (str, V.STRING))


def gguf_type(value: Any, unsigned: bool = False) -> gguf.GGUFValueType | None:
    for py_type, vtype in SCALAR_TYPES:
        if isinstance(value, py_type):
            return V.UINT32 if unsigned and vtype is V.INT64 else vtype
    return None


def add_value(writer: gguf.GGUFWriter, key: str, value: Any, unsigned: bool = False) -> bool:
    """Write one typed key; False (nothing written) for null, empty or mixed-type values."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        types = {gguf_type(v, unsigned) for v in value}
        if len(types) != 1 or None in types:
            return False
        writer.add_key_value(key, list(value), V.ARRAY, sub_type=types.pop())
        return True
    vtype = gguf_type(value, unsigned)
    if vtype is None:
        return False
    writer.add_key_value(key, value, vtype)
    return True


def add_config_fields(writer: gguf.GGUFWriter, prefix: str, fields: Mapping[str, Any]) -> None:
    """``{prefix}.{field}`` for each typed field, then ``{prefix}.config``: all of them as sorted JSON."""
    for name in sorted(fields):
        add_value(writer, f"{prefix}.{name}", fields[name])
    writer.add_string(f"{prefix}.config", json.dumps(dict(fields), sort_keys=True))
