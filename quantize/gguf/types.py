"""The GGUF file types quantmill can produce through libllama, as one table.

A *file type* (llama.cpp's ``llama_ftype``) names a recipe: a base tensor type plus,
for the K-quant mixes (``_S``/``_M``/``_L``) and some IQ types, rules that give chosen
tensors (attention V, FFN down, output) a larger type. ``nominal_bpw`` is the bits
per weight of the base tensor type; the real figure of a file is higher for mixes and
for models whose row lengths force fallbacks — measure it with
:func:`quantmill.quantize.gguf.inspect.summarize_gguf`.

The table names things; their numbers come from the libraries that use them, when first asked:
``llama_ftype`` values from llama-cpp-python's binding (``LLAMA_FTYPE_<name>``), ggml types (value,
block size, bytes per block) from libggml's own type traits.
"""
from __future__ import annotations

import ctypes
import functools
from typing import NamedTuple

from quantmill.errors import UnsupportedError, UserInputError
from quantmill.llama_lib import binding, c_function


class GGMLType(NamedTuple):
    """One ggml tensor type, as libggml describes it."""

    name: str  # upper case, as gguf-py and llama-quantize write it: Q4_K, F16, IQ2_XXS
    value: int  # enum ggml_type
    block_size: int  # weights per block
    type_size: int  # bytes per block

    @property
    def bpw(self) -> float:
        return 8.0 * self.type_size / self.block_size


@functools.cache
def ggml_types() -> dict[str, GGMLType]:
    """Every ggml type libggml knows (removed ones, whose block size is 0, left out), by name."""
    name = c_function("ggml_type_name", ctypes.c_char_p, ctypes.c_int)
    block = c_function("ggml_blck_size", ctypes.c_int64, ctypes.c_int)
    size = c_function("ggml_type_size", ctypes.c_size_t, ctypes.c_int)
    found = (GGMLType(name(v).decode().upper(), v, int(block(v)), int(size(v))) for v in range(binding().GGML_TYPE_COUNT))
    return {t.name: t for t in found if t.block_size > 0}


def ggml_type(name: str) -> GGMLType:
    return ggml_types()[name]


class GGUFFileType(NamedTuple):
    """One row of the table: a name users type and what libllama makes of it."""

    name: str
    ftype: str  # llama_ftype without its LLAMA_FTYPE_ prefix: MOSTLY_Q4_K_M
    base_type_name: str
    needs_imatrix: bool
    description: str

    @property
    def ftype_value(self) -> int:
        """The ``llama_ftype`` integer handed to ``llama_model_quantize``."""
        return int(getattr(binding(), f"LLAMA_FTYPE_{self.ftype}"))

    @property
    def base_type(self) -> GGMLType:
        return ggml_type(self.base_type_name)

    @property
    def nominal_bpw(self) -> float:
        """Bits per weight of the base tensor type (block bytes * 8 / block size)."""
        return self.base_type.bpw

    @property
    def is_quantized(self) -> bool:
        """False for the float types, which per-tensor overrides do not apply to."""
        return self.base_type_name not in FLOAT_TYPES


# The float tensor types: what libllama quantizes from, and what overrides do not apply to.
FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})

# name, llama_ftype, base tensor type, needs an importance matrix, description
_ROWS: tuple[tuple[str, str, str, bool, str], ...] = (
    ("F32", "ALL_F32", "F32", False, "32-bit float, no quantization"),
    ("F16", "MOSTLY_F16", "F16", False, "16-bit float (IEEE half)"),
    ("BF16", "MOSTLY_BF16", "BF16", False, "16-bit bfloat"),
    ("Q8_0", "MOSTLY_Q8_0", "Q8_0", False, "8-bit, blocks of 32 with one scale; near lossless"),
    ("Q5_1", "MOSTLY_Q5_1", "Q5_1", False, "legacy 5-bit, blocks of 32 with scale and minimum"),
    ("Q5_0", "MOSTLY_Q5_0", "Q5_0", False, "legacy 5-bit, blocks of 32 with one scale"),
    ("Q4_1", "MOSTLY_Q4_1", "Q4_1", False, "legacy 4-bit, blocks of 32 with scale and minimum"),
    ("Q4_0", "MOSTLY_Q4_0", "Q4_0", False, "legacy 4-bit, blocks of 32 with one scale"),
    ("Q6_K", "MOSTLY_Q6_K", "Q6_K", False, "K-quant 6-bit, super-blocks of 256"),
    ("Q5_K_M", "MOSTLY_Q5_K_M", "Q5_K", False, "K-quant 5-bit mix, some tensors in Q6_K"),
    ("Q5_K_S", "MOSTLY_Q5_K_S", "Q5_K", False, "K-quant 5-bit, nearly all tensors in Q5_K"),
    ("Q4_K_M", "MOSTLY_Q4_K_M", "Q4_K", False, "K-quant 4-bit mix, attn_v/ffn_down partly in Q6_K"),
    ("Q4_K_S", "MOSTLY_Q4_K_S", "Q4_K", False, "K-quant 4-bit, nearly all tensors in Q4_K"),
    ("Q3_K_L", "MOSTLY_Q3_K_L", "Q3_K", False, "K-quant 3-bit mix, attn_v/ffn_down in Q5_K"),
    ("Q3_K_M", "MOSTLY_Q3_K_M", "Q3_K", False, "K-quant 3-bit mix, attn_v/ffn_down in Q4_K"),
    ("Q3_K_S", "MOSTLY_Q3_K_S", "Q3_K", False, "K-quant 3-bit, nearly all tensors in Q3_K"),
    ("Q2_K", "MOSTLY_Q2_K", "Q2_K", False, "K-quant 2-bit mix, attn_v/ffn_down in Q3_K/Q4_K"),
    ("IQ4_NL", "MOSTLY_IQ4_NL", "IQ4_NL", False, "non-linear 4-bit, blocks of 32; better with an imatrix"),
    ("IQ4_XS", "MOSTLY_IQ4_XS", "IQ4_XS", False, "non-linear 4-bit, super-blocks of 256; better with an imatrix"),
    ("IQ3_M", "MOSTLY_IQ3_M", "IQ3_S", False, "3-bit IQ mix; better with an imatrix"),
    ("IQ3_S", "MOSTLY_IQ3_S", "IQ3_S", False, "3-bit IQ; better with an imatrix"),
    ("IQ3_XS", "MOSTLY_IQ3_XS", "IQ3_S", True, "3-bit IQ mix, some tensors in IQ3_XXS"),
    ("IQ3_XXS", "MOSTLY_IQ3_XXS", "IQ3_XXS", True, "3-bit IQ, smallest 3-bit"),
    ("Q2_K_S", "MOSTLY_Q2_K_S", "Q2_K", True, "K-quant 2-bit, nearly all tensors in Q2_K"),
    ("IQ2_M", "MOSTLY_IQ2_M", "IQ2_S", True, "2-bit IQ mix"),
    ("IQ2_S", "MOSTLY_IQ2_S", "IQ2_XS", True, "2-bit IQ, some tensors in IQ2_S"),
    ("IQ2_XS", "MOSTLY_IQ2_XS", "IQ2_XS", True, "2-bit IQ"),
    ("IQ2_XXS", "MOSTLY_IQ2_XXS", "IQ2_XXS", True, "2-bit IQ, smallest 2-bit"),
    ("IQ1_M", "MOSTLY_IQ1_M", "IQ1_M", True, "1.75-bit IQ"),
    ("IQ1_S", "MOSTLY_IQ1_S", "IQ1_S", True, "1.56-bit IQ"),
)

FILE_TYPES: dict[str, GGUFFileType] = {row[0]: GGUFFileType(*row) for row in _ROWS}

# llama-quantize's short names for the default mix of a K-quant size.
ALIASES: dict[str, str] = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}


def lookup_file_type(name: str) -> GGUFFileType:
    """The table row for ``name`` (case-insensitive, aliases allowed) or a UserInputError."""
    key = name.strip().upper()
    key = ALIASES.get(key, key)
    row = FILE_TYPES.get(key)
    if row is None:
        raise UserInputError(
            f"--type {name!r}: unknown GGUF quantization type; choose one of {', '.join(FILE_TYPES)}"
        )
    return row


def parse_tensor_type(name: str) -> GGMLType:
    """A ggml tensor type name (``Q6_K``, ``q8_0``, ``F16`` ...) for a per-tensor override."""
    key = name.strip().upper()
    allowed = override_tensor_types()
    if key not in ggml_types():
        raise UserInputError(f"tensor type {name!r}: unknown ggml type; choose one of {', '.join(allowed)}")
    if key not in allowed:
        raise UnsupportedError(f"tensor type {name!r}: not a type llama.cpp quantizes weights to; choose one of {', '.join(allowed)}")
    return ggml_type(key)


@functools.cache
def override_tensor_types() -> tuple[str, ...]:
    """Tensor types a per-tensor override may name: every base type above and the K/IQ sizes the mixes use."""
    names = {row.base_type_name for row in FILE_TYPES.values()} | {"Q3_K", "Q4_K", "Q5_K", "IQ2_S"}
    return tuple(sorted(names, key=lambda n: ggml_type(n).value))
