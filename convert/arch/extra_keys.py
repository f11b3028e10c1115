"""Architecture-specific config fields carried into GGUF metadata as typed keys (no runtime reads them).

Python values map to GGUF types as data: bool → BOOL, int → INT64 (UINT32 when the key
asks for it), float → FLOAT64, str → STRING, lists of one of those → ARRAY. ``None``
(JSON null) has no GGUF type: such a field is only in the ``{prefix}.config`` string, which
holds every carried field exactly as config.json has it (sorted JSON), so nothing is lost.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import gguf

# Python type → gguf.GGUFValueType member name, in the order tried (bool is an int too).
SCALAR_TYPES: tuple[tuple[type, str], ...] = ((bool, "BOOL"), (int, "INT64"), (float, "FLOAT64"), (str, "STRING"))


def gguf_type(value: Any, unsigned: bool = False) -> gguf.GGUFValueType | None:
    import gguf

    for py_type, name in SCALAR_TYPES:
        if isinstance(value, py_type):
            return gguf.GGUFValueType.UINT32 if unsigned and name == "INT64" else gguf.GGUFValueType[name]
    return None


def add_value(writer: gguf.GGUFWriter, key: str, value: Any, unsigned: bool = False) -> bool:
    """Write one typed key; False (nothing written) for null, empty or mixed-type values."""
    import gguf

    if isinstance(value, Sequence) and not isinstance(value, str):
        types = {gguf_type(v, unsigned) for v in value}
        if len(types) != 1 or None in types:
            return False
        writer.add_key_value(key, list(value), gguf.GGUFValueType.ARRAY, sub_type=types.pop())
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
