"""The LCKV configuration fields of a ``model_type: lckv-llama`` config.json, validated, and their GGUF keys.

``layer_types`` is a string such as ``0_20_20_…_20_21``: entry i is the layer whose keys and
values layer i attends to, optionally followed by ``s`` (that layer uses sliding-window
attention of ``sliding_window`` tokens). A layer computes KV exactly when some entry names
it, and such a layer must use its own KV (``layer_types[j] == j``), as the LCKV code requires.
A layer whose source is above it (or every layer, with ``force_nodiag``) cannot see the
current token's KV: its attention diagonal is masked. ``forward_passes`` / ``backward_passes``
are the training-time iteration counts (m and b in the paper), ``use_sequential`` asks for
token-by-token evaluation; all are carried unchanged.

GGUF keys (written by the HF → GGUF converter next to the llama keys; no runtime reads them):

* ``lckv.layer_types`` (string): config.json's value, verbatim
* ``lckv.kv_source`` (uint32 array, one per layer): the layer whose KV each layer uses
* ``lckv.sliding_window_layers`` (bool array, one per layer): the ``s`` flags
* ``lckv.sliding_window`` (uint32), ``lckv.forward_passes`` (uint32), ``lckv.backward_passes`` (uint32)
* ``lckv.use_sequential`` (bool), ``lckv.force_nodiag`` (bool)
* ``lckv.config`` (string): the LCKV fields exactly as config.json holds them, as sorted JSON
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantmill.errors import InputFileError

MODEL_TYPE = "lckv-llama"
# LCKV fields and the defaults of the LCKV code's configuration class
DEFAULTS: dict[str, Any] = {"forward_passes": 7, "backward_passes": 2, "sliding_window": 4096, "use_sequential": False, "force_nodiag": False}
FIELDS = ("layer_types", *DEFAULTS)
_ENTRY = re.compile(r"(\d+)(s?)")
FIX = "fix layer_types in config.json (one entry per layer: the index of the layer whose KV it uses, optionally with an s suffix)"


def is_lckv(config: dict[str, Any]) -> bool:
    return config.get("model_type") == MODEL_TYPE


@dataclass(frozen=True)
class LckvSpec:
    """The validated LCKV layout of one checkpoint."""

    layer_types: str
    kv_source: tuple[int, ...]
    sliding: tuple[bool, ...]
    sliding_window: int | None
    forward_passes: int
    backward_passes: int
    use_sequential: bool
    force_nodiag: bool
    raw: dict[str, Any]  # the LCKV fields as config.json has them

    @property
    def n_layers(self) -> int:
        return len(self.kv_source)

    def computes_kv(self, layer: int) -> bool:
        return layer in self.kv_source

    def attends_above(self, layer: int) -> bool:
        return self.kv_source[layer] > layer

    def masks_diagonal(self, layer: int) -> bool:
        return self.force_nodiag or self.attends_above(layer)

    def window(self, layer: int) -> int | None:
        return self.sliding_window if self.sliding[layer] else None

    def cyclic_span(self) -> tuple[int, int] | None:
        """(low, high): the layers [low, high) that depend on KV computed above them, else None."""
        above = [i for i in range(self.n_layers) if self.attends_above(i)]
        if not above:
            return None
        return above[0], max(self.kv_source[i] for i in above) + 1

    def gguf_keys(self) -> dict[str, Any]:
        keys: dict[str, Any] = {
            "lckv.layer_types": self.layer_types,
            "lckv.kv_source": list(self.kv_source),
            "lckv.sliding_window_layers": list(self.sliding),
            "lckv.forward_passes": self.forward_passes,
            "lckv.backward_passes": self.backward_passes,
            "lckv.use_sequential": self.use_sequential,
            "lckv.force_nodiag": self.force_nodiag,
            "lckv.config": json.dumps(self.raw, sort_keys=True),
        }
        if self.sliding_window is not None:
            keys["lckv.sliding_window"] = self.sliding_window
        return keys


def _int_field(config: dict[str, Any], key: str, path: Path) -> int:
    value = config.get(key, DEFAULTS[key])
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InputFileError(path, f"field {key!r} is {value!r}, expected a positive integer", "fix config.json")
    return value


def _bool_field(config: dict[str, Any], key: str, path: Path) -> bool:
    value = config.get(key, DEFAULTS[key])
    if not isinstance(value, bool):
        raise InputFileError(path, f"field {key!r} is {value!r}, expected true or false", "fix config.json")
    return value


def parse_lckv(config: dict[str, Any], path: Path) -> LckvSpec:
    """Validate the LCKV fields of ``config`` (read from ``path``); InputFileError names the field and the fix."""
    n_layers = config.get("num_hidden_layers")
    if not isinstance(n_layers, int) or isinstance(n_layers, bool) or n_layers <= 0:
        raise InputFileError(path, f"field 'num_hidden_layers' is {n_layers!r}, expected a positive integer", "fix config.json")
    text = config.get("layer_types", "_".join(map(str, range(n_layers))))
    if not isinstance(text, str):
        raise InputFileError(path, f"field 'layer_types' is {text!r}, not a string such as '0_2_2'", FIX)
    sources: list[int] = []
    sliding: list[bool] = []
    for i, entry in enumerate(text.split("_")):
        match = _ENTRY.fullmatch(entry)
        if match is None:
            raise InputFileError(path, f"layer_types entry {i} is {entry!r}, not a layer index with an optional 's'", FIX)
        sources.append(int(match.group(1)))
        sliding.append(bool(match.group(2)))
    if len(sources) != n_layers:
        raise InputFileError(path, f"layer_types {text!r} has {len(sources)} entries but num_hidden_layers is {n_layers}", FIX)
    for i, src in enumerate(sources):
        if src >= n_layers:
            raise InputFileError(path, f"layer_types entry {i} points to layer {src}, outside the model's layers 0..{n_layers - 1}", FIX)
        if sources[src] != src:
            raise InputFileError(
                path, f"layer {i} uses the KV of layer {src}, but layer {src} uses layer {sources[src]}'s; a KV source must use its own KV", FIX
            )
    window = None if config.get("sliding_window", 0) is None and not any(sliding) else _int_field(config, "sliding_window", path)
    raw = {key: config[key] for key in FIELDS if key in config}
    return LckvSpec(
        text, tuple(sources), tuple(sliding), window,
        _int_field(config, "forward_passes", path), _int_field(config, "backward_passes", path),
        _bool_field(config, "use_sequential", path), _bool_field(config, "force_nodiag", path), raw,
    )


def check_kv_tensors(spec: LckvSpec, names: set[str], path: Path, prefix: str = "model.layers.{index}.self_attn.") -> None:
    """Layers that compute KV have k_proj/v_proj and the others have none, or InputFileError."""
    for index in range(spec.n_layers):
        for proj in ("k_proj", "v_proj"):
            name = prefix.format(index=index) + f"{proj}.weight"
            present = name in names or any(n.startswith(prefix.format(index=index) + f"{proj}.") for n in names)
            if present != spec.computes_kv(index):
                state = "has" if present else "lacks"
                raise InputFileError(
                    path, f"layer {index} {state} {proj} but layer_types {spec.layer_types!r} says it "
                    f"{'computes' if spec.computes_kv(index) else 'computes no'} KV", "check that layer_types belongs to these weights"
                )
