"""The GGUF file types quantmill can produce through libllama, as one table.

A *file type* (llama.cpp's ``llama_ftype``) names a recipe: a base tensor type plus,
for the K-quant mixes (``_S``/``_M``/``_L``) and some IQ types, rules that give chosen
tensors (attention V, FFN down, output) a larger type. ``nominal_bpw`` is the bits
per weight of the base tensor type; the real figure of a file is higher for mixes and
for models whose row lengths force fallbacks — measure it with
:func:`quantmill.quantize.gguf.inspect.summarize_gguf`.
"""
from __future__ import annotations

from dataclasses import dataclass

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from quantmill.errors import UnsupportedError, UserInputError


@dataclass(frozen=True)
class GGUFFileType:
    """One row of the table: a name users type and what libllama makes of it."""

    name: str
    ftype: LlamaFileType
    base_type: GGMLQuantizationType
    needs_imatrix: bool
    description: str

    @property
    def ftype_value(self) -> int:
        """The ``llama_ftype`` integer handed to ``llama_model_quantize``."""
        return int(self.ftype)

    @property
    def nominal_bpw(self) -> float:
        """Bits per weight of the base tensor type (block bytes * 8 / block size)."""
        block_size, type_size = GGML_QUANT_SIZES[self.base_type]
        return 8.0 * type_size / block_size

    @property
    def is_quantized(self) -> bool:
        """False for the float types, which per-tensor overrides do not apply to."""
        return self.base_type not in _FLOAT_TYPES


_FLOAT_TYPES = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16})

_F = LlamaFileType
_T = GGMLQuantizationType

# name, llama_ftype, base tensor type, needs an importance matrix, description
_ROWS: tuple[tuple[str, LlamaFileType, GGMLQuantizationType, bool, str], ...] = (
    ("F32", _F.ALL_F32, _T.F32, False, "32-bit float, no quantization"),
    ("F16", _F.MOSTLY_F16, _T.F16, False, "16-bit float (IEEE half)"),
    ("BF16", _F.MOSTLY_BF16, _T.BF16, False, "16-bit bfloat"),
    ("Q8_0", _F.MOSTLY_Q8_0, _T.Q8_0, False, "8-bit, blocks of 32 with one scale; near lossless"),
    ("Q5_1", _F.MOSTLY_Q5_1, _T.Q5_1, False, "legacy 5-bit, blocks of 32 with scale and minimum"),
    ("Q5_0", _F.MOSTLY_Q5_0, _T.Q5_0, False, "legacy 5-bit, blocks of 32 with one scale"),
    ("Q4_1", _F.MOSTLY_Q4_1, _T.Q4_1, False, "legacy 4-bit, blocks of 32 with scale and minimum"),
    ("Q4_0", _F.MOSTLY_Q4_0, _T.Q4_0, False, "legacy 4-bit, blocks of 32 with one scale"),
    ("Q6_K", _F.MOSTLY_Q6_K, _T.Q6_K, False, "K-quant 6-bit, super-blocks of 256"),
    ("Q5_K_M", _F.MOSTLY_Q5_K_M, _T.Q5_K, False, "K-quant 5-bit mix, some tensors in Q6_K"),
    ("Q5_K_S", _F.MOSTLY_Q5_K_S, _T.Q5_K, False, "K-quant 5-bit, nearly all tensors in Q5_K"),
    ("Q4_K_M", _F.MOSTLY_Q4_K_M, _T.Q4_K, False, "K-quant 4-bit mix, attn_v/ffn_down partly in Q6_K"),
    ("Q4_K_S", _F.MOSTLY_Q4_K_S, _T.Q4_K, False, "K-quant 4-bit, nearly all tensors in Q4_K"),
    ("Q3_K_L", _F.MOSTLY_Q3_K_L, _T.Q3_K, False, "K-quant 3-bit mix, attn_v/ffn_down in Q5_K"),
    ("Q3_K_M", _F.MOSTLY_Q3_K_M, _T.Q3_K, False, "K-quant 3-bit mix, attn_v/ffn_down in Q4_K"),
    ("Q3_K_S", _F.MOSTLY_Q3_K_S, _T.Q3_K, False, "K-quant 3-bit, nearly all tensors in Q3_K"),
    ("Q2_K", _F.MOSTLY_Q2_K, _T.Q2_K, False, "K-quant 2-bit mix, attn_v/ffn_down in Q3_K/Q4_K"),
    ("IQ4_NL", _F.MOSTLY_IQ4_NL, _T.IQ4_NL, False, "non-linear 4-bit, blocks of 32; better with an imatrix"),
    ("IQ4_XS", _F.MOSTLY_IQ4_XS, _T.IQ4_XS, False, "non-linear 4-bit, super-blocks of 256; better with an imatrix"),
    ("IQ3_M", _F.MOSTLY_IQ3_M, _T.IQ3_S, False, "3-bit IQ mix; better with an imatrix"),
    ("IQ3_S", _F.MOSTLY_IQ3_S, _T.IQ3_S, False, "3-bit IQ; better with an imatrix"),
    ("IQ3_XS", _F.MOSTLY_IQ3_XS, _T.IQ3_S, True, "3-bit IQ mix, some tensors in IQ3_XXS"),
    ("IQ3_XXS", _F.MOSTLY_IQ3_XXS, _T.IQ3_XXS, True, "3-bit IQ, smallest 3-bit"),
    ("Q2_K_S", _F.MOSTLY_Q2_K_S, _T.Q2_K, True, "K-quant 2-bit, nearly all tensors in Q2_K"),
    ("IQ2_M", _F.MOSTLY_IQ2_M, _T.IQ2_S, True, "2-bit IQ mix"),
    ("IQ2_S", _F.MOSTLY_IQ2_S, _T.IQ2_XS, True, "2-bit IQ, some tensors in IQ2_S"),
    ("IQ2_XS", _F.MOSTLY_IQ2_XS, _T.IQ2_XS, True, "2-bit IQ"),
    ("IQ2_XXS", _F.MOSTLY_IQ2_XXS, _T.IQ2_XXS, True, "2-bit IQ, smallest 2-bit"),
    ("IQ1_M", _F.MOSTLY_IQ1_M, _T.IQ1_M, True, "1.75-bit IQ"),
    ("IQ1_S", _F.MOSTLY_IQ1_S, _T.IQ1_S, True, "1.56-bit IQ"),
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


def parse_tensor_type(name: str) -> GGMLQuantizationType:
    """A ggml tensor type name (``Q6_K``, ``q8_0``, ``F16`` ...) for a per-tensor override."""
    key = name.strip().upper()
    try:
        tensor_type = GGMLQuantizationType[key]
    except KeyError:
        raise UserInputError(
            f"tensor type {name!r}: unknown ggml type; choose one of "
            f"{', '.join(t.name for t in OVERRIDE_TENSOR_TYPES)}"
        ) from None
    if tensor_type not in OVERRIDE_TENSOR_TYPES:
        raise UnsupportedError(
            f"tensor type {name!r}: not a type llama.cpp quantizes weights to; choose one of "
            f"{', '.join(t.name for t in OVERRIDE_TENSOR_TYPES)}"
        )
    return tensor_type


# Tensor types a per-tensor override may name: the float types and every base type above.
OVERRIDE_TENSOR_TYPES: tuple[GGMLQuantizationType, ...] = tuple(
    sorted({row.base_type for row in FILE_TYPES.values()} | {_T.Q3_K, _T.Q4_K, _T.Q5_K, _T.IQ2_S}, key=int)
)
