"""Helpers for the release tests: a tiny model with a 400-token BPE vocabulary, recipes, the CLI.

The model is a tiny random llama GGUF (tests/tiny_gguf.py) turned into a float32 Hugging Face
checkpoint by quantmill's GGUF -> HF converter, so its tokenizer matches llama.cpp's and its small
vocabulary keeps every GGUF read fast.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
QUANTMILL = [sys.executable, "-m", "quantmill.cli"]

# Every stage kind, small: two GPTQ branches (one main), an imatrix K-quant, verify with a threshold.
TINY_RECIPE: dict[str, Any] = {
    "name": "tiny",
    "source": {"kind": "local", "path": "model"},
    "calibration": {"corpus": "bundled", "samples": 4, "seqlen": 64, "seed": 7},
    "gptq": {"branches": [{"bits": 4, "group_size": 32, "main": True}, {"bits": 8, "group_size": -1}]},
    "gguf": {"base": "f16", "types": ["Q4_K_M"], "imatrix": True, "vocab_pre": "smollm"},
    "verify": {"n_ctx": 64, "max_chunks": 4, "thresholds": {"max_delta_ppl_pct": 50.0},
               "use_default_thresholds": False},  # a random model is far from verify's per-type limits
    "card": {"creator": "tests", "base_model": "tests/tiny", "license": "apache-2.0"},
    "work_dir": "work",
    "threads": 2,
}


def make_tiny_model(directory: Path, n_layer: int = 2) -> Path:
    """A float32 HF checkpoint of a tiny llama (``n_layer`` layers, hidden 64, 400-token BPE vocabulary)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tiny_gguf import TinyShape, bpe_vocab, write_tiny_gguf

    from quantmill.convert.gguf_to_hf import gguf_to_hf

    directory.parent.mkdir(parents=True, exist_ok=True)
    gguf_path = directory.parent / f".{directory.name}.gguf"
    write_tiny_gguf(gguf_path, bpe_vocab(), TinyShape(n_layer=n_layer), tied=False, seed=11)
    gguf_to_hf(gguf_path, directory, dtype="float32", progress=False)
    gguf_path.unlink()
    return directory


def write_recipe(root: Path, recipe: dict[str, Any] | None = None, name: str = "release.yaml", **changes: Any) -> Path:
    data = json.loads(json.dumps(recipe if recipe is not None else TINY_RECIPE))
    data.update(changes)
    path = root / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def cli(*args: str, cwd: Path, check: bool = False, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*QUANTMILL, *args], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"quantmill {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def run_and_check_release(recipe: Path, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
                          passed: bool | None = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``recipe`` through the CLI (exit 0) and check the release it wrote, as mergekit's run_and_check_merge does.

    Checks: the ``--json`` report names an output directory with a manifest; every file of the release is in the
    manifest with its size and sha256 (hashed here), and nothing the manifest lists is missing; the verification
    verdict is ``passed`` (None: not checked); every GGUF loads in llama-cpp-python. Returns (report, manifest).
    """
    result = cli("run", str(recipe), "--json", *args, cwd=cwd or recipe.parent, env=env, check=True)
    report = json.loads(result.stdout)
    release = Path(report["work_dir"]) / "release"
    manifest = json.loads((release / "manifest.json").read_text(encoding="utf-8"))
    files = {k: v for k, v in output_hashes(release).items() if k != "manifest.json"}
    assert {k: v["sha256"] for k, v in manifest["outputs"].items()} == files
    assert all(v["size"] == (release / k).stat().st_size for k, v in manifest["outputs"].items())
    if passed is not None:
        assert report["verification_passed"] is passed and manifest["verification"]["passed"] is passed
    for gguf_file in sorted(release.glob("gguf/*.gguf")):
        from llama_cpp import Llama

        Llama(str(gguf_file), n_ctx=32, vocab_only=True, verbose=False).close()
    return report, manifest


def output_hashes(release_dir: Path) -> dict[str, str]:
    """sha256 of every file in a release directory, hashed here (not read from its manifest)."""
    found = {}
    for path in sorted(p for p in release_dir.rglob("*") if p.is_file()):
        found[path.relative_to(release_dir).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def tree_snapshot(directory: Path) -> dict[str, tuple[int, float, str]]:
    """Every path under ``directory`` with size, mtime and sha256 (files), to show nothing changed."""
    if not directory.exists():
        return {}
    snap = {}
    for path in sorted(directory.rglob("*")):
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        snap[path.relative_to(directory).as_posix()] = (stat.st_size if path.is_file() else 0, stat.st_mtime, digest)
    return snap
