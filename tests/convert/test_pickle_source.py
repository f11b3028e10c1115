"""A source that ships only PyTorch pickles: refused before any work unless the recipe says allow_pickle, then
converted once to safetensors (weights_only=True), giving exactly the tensors of a safetensors save."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from quantmill.cli import main


def _pickle_model(make_tiny_llama, name: str, shards: int) -> Path:  # type: ignore[no-untyped-def]
    """The tiny checkpoint as an old-style pickle upload (next to its safetensors original, ``NAME-st``)."""
    import shutil

    from families import to_pickle_upload

    model_dir = make_tiny_llama("sp", name=name + "-st")
    out = model_dir.parent / name
    shutil.copytree(model_dir, out)
    to_pickle_upload(out, shards)
    assert not list(out.glob("*.safetensors")) and list(out.glob("pytorch_model*.bin"))
    return out


def _recipe(tmp_path: Path, model: Path, allow_pickle: bool) -> Path:
    source = {"kind": "local", "path": str(model), **({"allow_pickle": True} if allow_pickle else {})}
    recipe = {"name": "pk", "source": source, "work_dir": str(tmp_path / "work"), "gguf": {"base": "f16", "types": []},
              "verify": None}
    path = tmp_path / "release.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def test_pickle_only_source_is_refused_before_any_work(make_tiny_llama, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _pickle_model(make_tiny_llama, "pk", 1)
    capsys.readouterr()
    assert main(["run", str(_recipe(tmp_path, model, False)), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "allow_pickle: true" in err and str(model) in err
    assert not (tmp_path / "work" / "stages").exists()


@pytest.mark.parametrize("shard", [1, 3], ids=["single", "sharded"])
def test_allowed_pickles_become_safetensors(shard: int, make_tiny_llama, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    from quantmill.pipeline.plan import model_files

    model = _pickle_model(make_tiny_llama, f"pk-{shard}", shard)
    assert main(["run", str(_recipe(tmp_path, model, True)), "--no-publish"]) == 0
    [source] = (tmp_path / "work" / "stages").glob("source-*")
    converted = source / "pk"
    assert not list(converted.glob("*.bin")) and (converted / "model.safetensors.index.json").is_file() == (shard > 1)
    reference = {}
    for f in (model.parent / f"pk-{shard}-st").glob("*.safetensors"):
        reference.update(load_file(str(f)))
    ours = {}
    for f in converted.glob("*.safetensors"):
        ours.update(load_file(str(f)))
    assert sorted(ours) == sorted(reference)
    for name, value in reference.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
    assert {p.name for p in model_files(converted)} >= {"config.json", "tokenizer.model"}
    assert list((tmp_path / "work" / "release" / "gguf").glob("*.gguf"))
