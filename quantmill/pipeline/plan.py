"""A recipe as a DAG of stages, each keyed by the hash of its parameters and its inputs' keys.

A stage's key is sha256 over (kind, the kind's format version, its typed parameters as canonical
JSON, the keys of the stages it reads); the source stage's parameters include the sha256 of every
source file, so a changed input changes every key downstream. A finished stage lives in
``WORK/stages/<name>-<key[:16]>``: the same recipe on the same inputs finds every stage finished
and does nothing. Each kind is one record in :mod:`quantmill.pipeline.stages`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from quantmill.errors import InputFileError
from quantmill.hashing import sha256_file
from quantmill.manifest import canonical_json
from quantmill.pipeline.context import StageParams, gguf_file_name
from quantmill.pipeline.stages import (
    STAGES,
    bake,
    calibrate,
    gguf,
    gguf_base,
    gguf_mix,
    gptq,
    imatrix,
    merge,
    release,
    source,
    verify,
)
from quantmill.pipeline.stages.source import check_source_weights, model_files
from quantmill.recipe import BundledSource, HubSource, LoadedRecipe, LocalSource

STAGES_DIR = "stages"
DONE_FILE = ".stage.json"
CHECKPOINTS_DIR = ".checkpoints"


@dataclass(frozen=True)
class Node:
    """One stage of the plan."""

    name: str
    kind: str
    params: StageParams
    deps: tuple[str, ...]
    key: str = ""
    paths: dict[str, Path] = field(default_factory=dict)  # inputs outside the work directory (not hashed: their sha256 is)

    def directory(self, work_dir: Path) -> Path:
        return work_dir / STAGES_DIR / f"{self.name}-{self.key[:16]}"

    def checkpoints(self, work_dir: Path) -> Path:
        """Where the stage keeps its layer checkpoints while it runs (kept across kills, removed when it is done)."""
        return work_dir / STAGES_DIR / CHECKPOINTS_DIR / self.directory(work_dir).name

    def is_done(self, work_dir: Path) -> bool:
        return (self.directory(work_dir) / DONE_FILE).is_file()


@dataclass
class Plan:
    recipe: LoadedRecipe
    release_name: str
    nodes: list[Node] = field(default_factory=list)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)


def stage_key(kind: str, params: StageParams, dep_keys: list[str]) -> str:
    payload = canonical_json({"kind": kind, "version": STAGES[kind].version, "params": params.model_dump(mode="json"),
                              "deps": dep_keys})
    return hashlib.sha256(payload.encode("ascii")).hexdigest()


def _hash_dir(directory: Path, allow_pickle: bool = False) -> dict[str, str]:
    files = model_files(directory)
    if allow_pickle:
        from quantmill.convert.pickle_weights import pickle_shards

        files = sorted({*files, *pickle_shards(directory)})
    return {p.name: sha256_file(p) for p in files}


def _input_files(loaded: LoadedRecipe, value: str, bundled: list[Path]) -> list[Path]:
    """The files of a corpus / text input: the file, or the bundled corpus files (none for generated / hub)."""
    path = loaded.input_path(value)
    return [path] if path is not None else (bundled if value == "bundled" else [])


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


def _config_only(directory: Path) -> bool:
    """config.json and no weights of any kind: a model a dry run can cost but no run can build."""
    from quantmill.convert.pickle_weights import pickle_shards

    has_weights = any(p.suffix == ".safetensors" for p in directory.iterdir()) or bool(pickle_shards(directory))
    return (directory / "config.json").is_file() and not has_weights


def _source_params(loaded: LoadedRecipe, name: str, weights: bool) -> source.SourceParams:
    src = loaded.recipe.source
    if isinstance(src, BundledSource):
        from quantmill.default_model import REFERENCE_DTYPE, REFERENCE_FORMAT, bundled_gguf_path

        gguf_path = bundled_gguf_path()
        return source.SourceParams(origin="bundled", name=name, files={gguf_path.name: sha256_file(gguf_path)},
                                   dtype=REFERENCE_DTYPE, format=REFERENCE_FORMAT)
    if isinstance(src, LocalSource):
        directory = loaded.resolve(src.path)
        if not directory.is_dir():
            raise InputFileError(directory, "no such model directory", "fix source.path in the recipe")
        if weights or not _config_only(directory):
            check_source_weights(directory, src.allow_pickle)
        return source.SourceParams(origin="local", name=name, files=_hash_dir(directory, src.allow_pickle),
                                   allow_pickle=src.allow_pickle)
    assert isinstance(src, HubSource)
    return source.SourceParams(origin="hub", name=name, id=src.id, revision=src.revision, allow_pickle=src.allow_pickle)


def release_name(loaded: LoadedRecipe) -> str:
    recipe = loaded.recipe
    if recipe.name:
        return recipe.name
    if recipe.card.name:
        return recipe.card.name
    src = recipe.source
    if isinstance(src, LocalSource):
        return loaded.resolve(src.path).name
    if isinstance(src, HubSource):
        return src.id.split("/")[1]
    return "SmolLM2-135M-Instruct"


def build_plan(loaded: LoadedRecipe, weights: bool = True) -> Plan:
    """The stages of ``loaded``, in an order where every stage follows the stages it reads.

    ``weights`` False (a dry run): a local source may be config.json alone, to cost a model that is not here."""
    from quantmill.calib_data.bundled import calibration_files, eval_file
    from quantmill.pipeline.snapshots import adapter_dir

    recipe = loaded.recipe
    name = release_name(loaded)
    plan = Plan(loaded, name)
    threads = recipe.threads
    device = recipe.resources.device

    def add(stage: str, kind: str, params: StageParams, deps: tuple[str, ...], **paths: Path | None) -> str:
        assert isinstance(params, STAGES[kind].params)
        keys = [plan.node(d).key for d in deps]
        found = {role: path for role, path in paths.items() if path is not None}
        plan.nodes.append(Node(stage, kind, params, deps, stage_key(kind, params, keys), found))
        return stage

    source_params = _source_params(loaded, name, weights)
    inputs = {f"source/{file}": sha for file, sha in source_params.files.items()}
    local = loaded.resolve(recipe.source.path) if isinstance(recipe.source, LocalSource) else None
    model = add("source", source.KIND.name, source_params, (), source=local)
    if recipe.adapters:
        adapters, where = [], {}
        for i, adapter in enumerate(recipe.adapters):  # a Hub adapter is hashed like a local one: by its files
            where[f"adapter{i}"] = adapter_dir(loaded, adapter)
            files = _hash_dir(where[f"adapter{i}"])
            inputs |= {f"adapters/{i}/{file}": sha for file, sha in files.items()}
            adapters.append(merge.AdapterParams(files=files, weight=adapter.weight))
        model = add("merge", merge.KIND.name, merge.MergeParams(model=model, adapters=tuple(adapters)), (model,), **where)
    if recipe.rope is not None:
        model = add("bake", bake.KIND.name, bake.BakeParams(model=model, rope=recipe.rope), (model,))

    calib = None
    needs_imatrix = recipe.gguf is not None and recipe.gguf.imatrix and bool(recipe.gguf.types or recipe.gguf.mixes)
    if recipe.gptq is not None or needs_imatrix:
        cal = recipe.calibration
        corpus = loaded.input_path(cal.corpus)
        inputs |= {f"calibration/{f.name}": sha256_file(f) for f in _input_files(loaded, cal.corpus, calibration_files())}
        params: StageParams = calibrate.CalibrateParams(
            model=model, corpus=corpus.name if corpus else cal.corpus, corpus_sha256=input_sha256(loaded, cal.corpus),
            samples=cal.samples, seqlen=cal.seqlen, seed=cal.seed, text_field=cal.text_field, threads=threads)
        calib = add("calibrate", calibrate.KIND.name, params, (model,), corpus=corpus)

    artifacts: list[str] = []
    if recipe.gptq is not None:
        assert calib is not None
        branches = tuple(b.spec() for b in recipe.gptq.branches)
        size = recipe.gptq.branches_per_stage or len(branches)
        groups = [branches[i : i + size] for i in range(0, len(branches), size)]
        for i, group in enumerate(groups):
            params = gptq.GptqParams(model=model, calibration=calib, branches=group, threads=threads, device=device)
            artifacts.append(add("gptq" if len(groups) == 1 else f"gptq-{i + 1}", gptq.KIND.name, params, (model, calib)))
    if recipe.gguf is not None:
        base_file = gguf_file_name(name, recipe.gguf.base.upper())
        base = add("gguf-base", gguf_base.KIND.name, gguf_base.GgufBaseParams(
            model=model, outtype=recipe.gguf.base, vocab_pre=recipe.gguf.vocab_pre, file=base_file, threads=threads),
            (model,))
        artifacts.append(base)
        matrix = None
        if needs_imatrix:
            assert calib is not None
            matrix = add("imatrix", imatrix.KIND.name, imatrix.ImatrixParams(model=model, calibration=calib, threads=threads, device=device),
                         (model, calib))
        for file_type in recipe.gguf.types:
            params = gguf.GgufParams(type=file_type, base=base, base_file=base_file, imatrix=matrix,
                                     file=gguf_file_name(name, file_type), threads=threads)
            artifacts.append(add(f"gguf-{file_type}", gguf.KIND.name, params, (base, matrix) if matrix else (base,)))
        for mix in recipe.gguf.mixes:
            assert matrix is not None and calib is not None
            mix_params = gguf_mix.GgufMixParams(
                name=mix.name, target_bpw=mix.target_bpw, target_size=cast("int | None", mix.target_size),
                refine=mix.refine, model=model, calibration=calib, base=base, base_file=base_file, imatrix=matrix,
                file=gguf_file_name(name, mix.name), threads=threads)
            deps = (base, matrix, *((model, calib) if mix.refine else ()))
            artifacts.append(add(f"gguf-{mix.name}", gguf_mix.KIND.name, mix_params, deps))
    check = None
    if recipe.verify is not None:
        settings = recipe.verify
        text = loaded.input_path(settings.text)
        inputs |= {f"verify/{f.name}": sha256_file(f) for f in _input_files(loaded, settings.text, [eval_file()])}
        made = [o for node in map(plan.node, artifacts) for o in STAGES[node.kind].outputs(node.params)]
        measured = {o.artifact: str(o.dst) for o in made if o.artifact is not None}
        params = verify.VerifyParams(
            model=model, text=text.name if text else settings.text, n_ctx=settings.n_ctx, max_chunks=settings.max_chunks,
            text_sha256=input_sha256(loaded, settings.text),
            devices=tuple(settings.devices), thresholds=settings.thresholds, overrides=settings.overrides,
            use_default_thresholds=settings.use_default_thresholds, artifacts=measured, threads=threads)
        check = add("verify", verify.KIND.name, params, (model, *artifacts), text=text)
    release_deps = (model, *([calib] if calib else []), *artifacts, *([check] if check else []))
    recorded = {k: v for k, v in loaded.resolved().items() if k != "publish"}  # the manifest's recipe
    params = release.ReleaseParams(name=name, model=model, recipe=recorded, inputs=dict(sorted(inputs.items())),
                                   stages={n.name: n.key for n in plan.nodes}, threads=threads)
    add("release", release.KIND.name, params, release_deps)
    return plan
