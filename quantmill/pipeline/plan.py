"""A recipe as a DAG of stages, each keyed by the hash of its parameters and its inputs' keys.

A stage's key is sha256 over (kind, stage format version, parameters, the keys of the stages it
reads); the source stage's parameters include the sha256 of every source file, so a changed input
changes every key downstream. A finished stage lives in ``WORK/stages/<name>-<key[:16]>``: the same
recipe on the same inputs finds every stage finished and does nothing.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    from quantmill.hashing import sha256_file
except ImportError:  # before quantmill.hashing landed, the function lived with the GGUF reader
    from quantmill.convert.gguf_reader import sha256_file  # type: ignore[no-redef,attr-defined]
from quantmill.errors import InputFileError
from quantmill.recipe import BundledSource, HubSource, LoadedRecipe, LocalSource

# Bump a kind's version when its output for the same inputs changes (invalidates old stages).
STAGE_VERSIONS: dict[str, int] = {
    "source": 1, "merge": 1, "bake": 1, "calibrate": 1, "imatrix": 1, "gptq": 1,
    "gguf-base": 1, "gguf": 1, "verify": 1, "release": 1,
}
STAGES_DIR = "stages"
DONE_FILE = ".stage.json"


@dataclass(frozen=True)
class Node:
    """One stage of the plan."""

    name: str
    kind: str
    params: dict[str, Any]
    deps: tuple[str, ...]
    key: str = ""

    def directory(self, work_dir: Path) -> Path:
        return work_dir / STAGES_DIR / f"{self.name}-{self.key[:16]}"

    def is_done(self, work_dir: Path) -> bool:
        return (self.directory(work_dir) / DONE_FILE).is_file()


@dataclass
class Plan:
    recipe: LoadedRecipe
    release_name: str
    model_stage: str
    nodes: list[Node] = field(default_factory=list)
    source_files: dict[str, str] = field(default_factory=dict)  # name -> sha256 (the source stage's inputs)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def by_kind(self, kind: str) -> list[Node]:
        return [n for n in self.nodes if n.kind == kind]


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def stage_key(kind: str, params: dict[str, Any], dep_keys: list[str]) -> str:
    payload = canonical_json({"kind": kind, "version": STAGE_VERSIONS[kind], "params": params, "deps": dep_keys})
    return hashlib.sha256(payload.encode("ascii")).hexdigest()


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def model_files(directory: Path) -> list[Path]:
    """The files of a checkpoint directory a release reads (safetensors only, no pickles, no dotfiles)."""
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")
                  and not p.name.endswith(PICKLE_SUFFIXES))


def _hash_dir(directory: Path, allow_pickle: bool = False) -> dict[str, str]:
    files = model_files(directory)
    if allow_pickle:
        from quantmill.convert.pickle_weights import pickle_shards

        files = sorted({*files, *pickle_shards(directory)})
    return {p.name: sha256_file(p) for p in files}


def check_source_weights(directory: Path, allow_pickle: bool) -> None:
    """A source must have safetensors weights, or pickles it is allowed to convert: refused before any work."""
    from quantmill.convert.pickle_weights import pickle_shards

    if any(p.suffix == ".safetensors" for p in model_files(directory)):
        return
    if pickle_shards(directory):
        if allow_pickle:
            return
        raise InputFileError(directory, "has only PyTorch pickle weights (pytorch_model*.bin), which can run code when "
                             "loaded", "set allow_pickle: true on the recipe's source to convert them to safetensors "
                             "(torch.load with weights_only=True), or use a safetensors revision")
    raise InputFileError(directory, "has no .safetensors weights", "pass a complete Hugging Face checkpoint directory")


def input_sha256(loaded: LoadedRecipe, value: str) -> str:
    """sha256 of a corpus / text input: the file's, or the bundled corpus files' combined."""
    from quantmill.calib_data.bundled import calibration_files, eval_file

    path = loaded.input_path(value)
    if path is not None:
        return sha256_file(path)
    if value == "bundled":
        files = [*calibration_files(), eval_file()]
        return hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()
    return hashlib.sha256(value.encode()).hexdigest()  # generated / hub: named by their spec


def _source_params(loaded: LoadedRecipe) -> tuple[dict[str, Any], dict[str, str]]:
    source = loaded.recipe.source
    if isinstance(source, BundledSource):
        from quantmill.default_model import (
            REFERENCE_DTYPE,
            REFERENCE_FORMAT,
            bundled_gguf_path,
        )

        gguf = bundled_gguf_path()
        files = {gguf.name: sha256_file(gguf)}
        return {"kind": "bundled", "files": files, "dtype": REFERENCE_DTYPE, "format": REFERENCE_FORMAT}, files
    if isinstance(source, LocalSource):
        directory = loaded.resolve(source.path)
        if not directory.is_dir():
            raise InputFileError(directory, "no such model directory", "fix source.path in the recipe")
        check_source_weights(directory, source.allow_pickle)
        files = _hash_dir(directory, source.allow_pickle)
        return {"kind": "local", "files": files, **({"allow_pickle": True} if source.allow_pickle else {})}, files
    assert isinstance(source, HubSource)
    return {"kind": "hub", "id": source.id, "revision": source.revision,
            **({"allow_pickle": True} if source.allow_pickle else {})}, {}


def release_name(loaded: LoadedRecipe) -> str:
    recipe = loaded.recipe
    if recipe.name:
        return recipe.name
    if recipe.card.name:
        return recipe.card.name
    source = recipe.source
    if isinstance(source, LocalSource):
        return loaded.resolve(source.path).name
    if isinstance(source, HubSource):
        return source.id.split("/")[1]
    return "SmolLM2-135M-Instruct"


def build_plan(loaded: LoadedRecipe) -> Plan:
    """The stages of ``loaded``, in an order where every stage follows the stages it reads."""
    recipe = loaded.recipe
    name = release_name(loaded)
    source_params, source_files = _source_params(loaded)
    plan = Plan(loaded, name, "source", source_files=source_files)
    threads = recipe.threads

    def add(stage: str, kind: str, params: dict[str, Any], deps: tuple[str, ...]) -> str:
        keys = [plan.node(d).key for d in deps]
        plan.nodes.append(Node(stage, kind, params, deps, stage_key(kind, params, keys)))
        return stage

    model = add("source", "source", {**source_params, "name": name}, ())
    if recipe.adapters:
        from quantmill.pipeline.snapshots import adapter_dir  # a Hub adapter is hashed like a local one: by its files

        adapters = [{"files": _hash_dir(adapter_dir(loaded, a)), "weight": a.weight} for a in recipe.adapters]
        model = add("merge", "merge", {"adapters": adapters}, (model,))
    if recipe.rope is not None:
        model = add("bake", "bake", recipe.rope.model_dump(mode="json"), (model,))
    plan.model_stage = model

    calib = None
    needs_imatrix = recipe.gguf is not None and recipe.gguf.imatrix and bool(recipe.gguf.types)
    if recipe.gptq is not None or needs_imatrix:
        cal = recipe.calibration.model_dump(mode="json")
        cal["corpus_sha256"] = input_sha256(loaded, recipe.calibration.corpus)
        cal["corpus"] = Path(cal["corpus"]).name if loaded.input_path(recipe.calibration.corpus) else cal["corpus"]
        calib = add("calibrate", "calibrate", {**cal, "threads": threads}, (model,))

    artifacts: list[str] = []
    if recipe.gptq is not None:
        branches = [b.spec().short + f"@damp={b.damp}" for b in recipe.gptq.branches]
        assert calib is not None
        artifacts.append(add("gptq", "gptq", {"branches": branches, "threads": threads}, (model, calib)))
    if recipe.gguf is not None:
        base = add("gguf-base", "gguf-base", {"outtype": recipe.gguf.base, "vocab_pre": recipe.gguf.vocab_pre}, (model,))
        artifacts.append(base)
        imatrix = None
        if needs_imatrix:
            assert calib is not None
            imatrix = add("imatrix", "imatrix", {"threads": threads}, (model, calib))
        for file_type in recipe.gguf.types:
            deps = (base, imatrix) if imatrix else (base,)
            artifacts.append(add(f"gguf-{file_type}", "gguf", {"type": file_type}, deps))
    verify = None
    if recipe.verify is not None:
        params = recipe.verify.model_dump(mode="json")
        params["text_sha256"] = input_sha256(loaded, recipe.verify.text)
        params["text"] = Path(params["text"]).name if loaded.input_path(recipe.verify.text) else params["text"]
        verify = add("verify", "verify", {**params, "threads": threads}, (model, *artifacts))
    release_deps = (model, *([calib] if calib else []), *artifacts, *([verify] if verify else []))
    recorded = {k: v for k, v in loaded.resolved().items() if k != "publish"}  # the manifest's recipe
    add("release", "release", {"name": name, "recipe": recorded}, release_deps)
    return plan
