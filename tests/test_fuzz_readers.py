"""A bounded, deterministic fuzz run of the safetensors, GGUF and recipe readers (issue 12).

Real small files (a safetensors checkpoint, a tiny llama GGUF, a release recipe) are mutated by
hypothesis (bytes flipped, the file truncated or extended) and read by quantmill's readers. Each
read either succeeds or raises a :class:`QuantmillError` subclass: never another exception. When a
corrupted safetensors header is accepted, every tensor it describes must lie inside the file (no
invalid artifact read as valid). ``derandomize=True`` and a fixed example count keep CI repeatable.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from tiny_gguf import TinyShape, bpe_vocab, write_tiny_gguf  # noqa: E402

from quantmill.errors import QuantmillError  # noqa: E402

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

RECIPE = """\
name: tiny
source: {kind: local, path: model}
calibration: {corpus: bundled, samples: 4, seqlen: 64, seed: 7}
gptq:
  branches:
    - {bits: 4, group_size: 32, main: true}
gguf: {base: f16, types: [Q4_K_M], imatrix: true}
rope: {method: linear, factor: 2.0}
verify: null
work_dir: work
threads: 1
"""


@st.composite
def mutations(draw: st.DrawFn, size: int) -> list[tuple[str, int, bytes]]:
    """A few edits of a file of ``size`` bytes: flip bytes, truncate, extend."""
    edits = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "flip", "set", "truncate", "extend"]))
        where = draw(st.integers(0, max(0, size - 1)))
        if kind == "truncate":
            edits.append((kind, where, b""))
        elif kind == "extend":
            edits.append((kind, where, draw(st.binary(min_size=1, max_size=64))))
        else:
            edits.append((kind, where, draw(st.binary(min_size=1, max_size=8))))
    # bias toward the header, where a lie changes what is read
    if draw(st.booleans()):
        edits.append(("flip", draw(st.integers(0, min(size - 1, 200))), draw(st.binary(min_size=1, max_size=4))))
    return edits


def mutate(data: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    out = bytearray(data)
    for kind, where, payload in edits:
        where = min(where, max(0, len(out) - 1))
        if kind == "truncate":
            del out[where:]
        elif kind == "extend":
            out[where:where] = payload
        elif kind == "set":
            out[where:where + len(payload)] = payload
        else:
            for i, b in enumerate(payload):
                if where + i < len(out):
                    out[where + i] ^= b or 1
    return bytes(out)


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    tensors = {"a.weight": rng.standard_normal((8, 16)).astype(np.float32),
               "b.weight": rng.standard_normal((16,)).astype(np.float16), "c.bias": np.arange(4, dtype=np.int64)}
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    write_tiny_gguf(root / "m.gguf", bpe_vocab(300), TinyShape(), tied=True, seed=1)
    return {"safetensors": (root / "model.safetensors").read_bytes(), "gguf": (root / "m.gguf").read_bytes(),
            "recipe": RECIPE.encode()}


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    return tmp_path


def test_fuzz_safetensors_reader(originals: dict[str, bytes], scratch: Path) -> None:
    from quantmill.convert.safetensors_io import SafetensorsFile

    data = originals["safetensors"]

    @FUZZ
    @given(mutations(len(data)))
    def run(edits: list[tuple[str, int, bytes]]) -> None:
        path = scratch / "model.safetensors"
        path.write_bytes(mutate(data, edits))
        try:
            with SafetensorsFile(path) as st_file:
                size = path.stat().st_size
                for name, entry in st_file.entries.items():
                    assert entry.offset + entry.nbytes <= size, (name, entry)
                    np.asarray(st_file.array(name)).sum()  # every accepted tensor is readable
        except QuantmillError:
            pass

    run()


def test_fuzz_gguf_readers(originals: dict[str, bytes], scratch: Path) -> None:
    from quantmill.convert.gguf_reader import GGUFFile
    from quantmill.quantize.gguf.inspect import summarize_gguf

    data = originals["gguf"]

    @FUZZ
    @given(mutations(len(data)))
    def run(edits: list[tuple[str, int, bytes]]) -> None:
        path = scratch / "m.gguf"
        path.write_bytes(mutate(data, edits))
        for read in (lambda: GGUFFile.open(path), lambda: summarize_gguf(path)):
            try:
                read()
            except QuantmillError:
                pass

    run()


def test_fuzz_recipe_loader(originals: dict[str, bytes], scratch: Path) -> None:
    from quantmill.recipe_load import load_recipe

    data = originals["recipe"]
    (scratch / "model").mkdir(exist_ok=True)
    (scratch / "model" / "config.json").write_text("{}", encoding="utf-8")

    @FUZZ
    @given(mutations(len(data)))
    def run(edits: list[tuple[str, int, bytes]]) -> None:
        path = scratch / "release.yaml"
        path.write_bytes(mutate(data, edits))
        try:
            load_recipe(path)
        except QuantmillError:
            pass

    run()
