"""The shipped example recipes (quantmill/recipes/examples): each parses, plans, and runs end to end, unmodified,
on a tiny random replica of its model placed in an offline Hugging Face cache under the recipe's own Hub id.

The replicas keep each model's shape family (Falcon-40B's GQA + two layer norms, Llama 3.1's llama3 RoPE, LCKV's
w2 layout, LongLLaMA's config and SentencePiece vocabulary) at hidden sizes that are multiples of 256 where the
recipe makes K-quants, so llama.cpp keeps the K-quant types instead of falling back to legacy ones. The only
change to a shipped recipe is :data:`SHRINK`: sizes that cost time only (calibration and verify lengths, the
disk reserve sized for the real model), never the source, the artifacts or the thresholds.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import SP_VOCAB_SIZE, build_tiny_llama
from release_helpers import cli

from quantmill.recipe_load import validate_recipe
from quantmill.recipes import describe, example_names, example_text, list_examples

EXAMPLES = ["alfred-40b-1023", "kevin-lora", "lckv-tinyllama-w2", "long-llama-3b"]
# The one documented change the end-to-end tests make to a shipped recipe: sizes that only cost time.
SHRINK: dict[str, Any] = {
    "calibration": {"samples": 4, "seqlen": 64},
    "verify": {"n_ctx": 64, "max_chunks": 4},
    "disk_reserve": 0,  # the shipped reserve is sized for the real model's files
}
COMMIT = re.compile(r"^[0-9a-f]{40}$")
BPE_VOCAB = 49152  # SmolLM2's tokenizer (conftest's smollm2_tokenizer_dir), recognised by llama.cpp's probe


# ---- an offline Hugging Face cache, laid out as huggingface_hub lays it out


def put_in_hub_cache(cache: Path, repo_id: str, revision: str, files: Path) -> Path:
    """``files`` as ``models--OWNER--NAME`` at ``revision``: blobs named by content, snapshot symlinks, refs."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = revision if COMMIT.match(revision) else hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in files.iterdir() if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        if not blob.exists():
            shutil.copyfile(path, blob)
        (snapshot / path.name).unlink(missing_ok=True)  # a re-upload under the same ref replaces the file
        (snapshot / path.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    if not COMMIT.match(revision):
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
    return snapshot


def hub_env(cache: Path) -> dict[str, str]:
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(cache.parent / "hf_home")}


# ---- the examples as data


def example_recipe(name: str) -> dict[str, Any]:
    return yaml.safe_load(example_text(name))


def shrunk(name: str) -> dict[str, Any]:
    data = example_recipe(name)
    for key, value in SHRINK.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    return data


def hub_repos(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(id, revision) of the source and every Hub adapter of a recipe."""
    repos = [(data["source"]["id"], data["source"]["revision"])]
    return repos + [(a["hub"]["id"], a["hub"]["revision"]) for a in data.get("adapters") or [] if "hub" in a]


def test_examples_are_listed_with_their_first_comment_line() -> None:
    assert example_names() == EXAMPLES
    listed = dict(list_examples())
    for name in EXAMPLES:
        first = example_text(name).splitlines()[0]
        assert first.startswith("# ") and listed[name] == first[2:] == describe(example_text(name))


def test_init_list_and_example(tmp_path: Path) -> None:
    listed = cli("init", "--list", cwd=tmp_path, check=True).stdout.splitlines()
    assert [line.split()[0] for line in listed] == EXAMPLES
    cli("init", "--example", "long-llama-3b", cwd=tmp_path, check=True)
    written = tmp_path / "long-llama-3b.yaml"
    assert written.read_text(encoding="utf-8") == example_text("long-llama-3b")
    cli("init", "--example", "kevin-lora", "mine.yaml", cwd=tmp_path, check=True)
    assert (tmp_path / "mine.yaml").read_text(encoding="utf-8") == example_text("kevin-lora")

    again = cli("init", "--example", "long-llama-3b", cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert written.read_text(encoding="utf-8") == example_text("long-llama-3b")
    unknown = cli("init", "--example", "nope", str(tmp_path / "x.yaml"), cwd=tmp_path)
    err = unknown.stderr.strip()
    assert unknown.returncode == 2 and "\n" not in err and all(n in err for n in EXAMPLES), err
    assert not (tmp_path / "x.yaml").exists()


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_is_a_pinned_hub_release(name: str) -> None:
    recipe = validate_recipe(example_recipe(name), Path(f"{name}.yaml"))
    assert recipe.source.kind == "hub"
    text = example_text(name)
    for _, revision in hub_repos(example_recipe(name)):
        assert COMMIT.match(revision) or (revision == "main" and ("PIN IT" in text or "REPLACE" in text)), revision
    if name == "alfred-40b-1023":
        assert recipe.rope is not None and recipe.rope.method == "ntk-yarn"
        assert [b.spec().release_name for b in recipe.gptq.branches] == ALFRED_BRANCHES
        assert recipe.gptq.main_index == 0 and {b.damp for b in recipe.gptq.branches} == {0.1}
        assert recipe.card.license == "apache-2.0" and recipe.card.creator == "LightOn AI"
        assert recipe.card.prompt_template.startswith("<start_system>You are Alfred") and "{prompt}" in recipe.card.prompt_template
    if name == "lckv-tinyllama-w2":
        assert recipe.gguf is None and recipe.lckv is None


def fake_adapter(directory: Path) -> Path:
    """Just enough of a PEFT folder for planning (the plan hashes an adapter's files; it does not read them)."""
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (directory / "adapter_model.safetensors").write_bytes(b"not read when planning")
    return directory


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_dry_run_plans_it(name: str, tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    cache.mkdir()
    data = example_recipe(name)
    for repo_id, revision in hub_repos(data)[1:]:
        put_in_hub_cache(cache, repo_id, revision, fake_adapter(tmp_path / "adapter"))
    cli("init", "--example", name, "release.yaml", cwd=tmp_path, check=True)
    result = cli("run", "release.yaml", "--dry-run", "--json", cwd=tmp_path, env=hub_env(cache), check=True)
    stages = [s["stage"] for s in json.loads(result.stdout)["stages"]]
    assert stages[0] == "source" and stages[-1] == "release" and "verify" in stages
    assert ("merge" in stages) == bool(data.get("adapters")) and ("bake" in stages) == ("rope" in data)
    assert ("gptq" in stages) == ("gptq" in data)
    quants = [s.removeprefix("gguf-") for s in stages if s.startswith("gguf-") and s != "gguf-base"]
    assert quants == (data.get("gguf") or {}).get("types", [])
    assert not (tmp_path / "work" / "stages").exists()


def test_hub_adapter_is_hashed_into_the_plan_like_a_local_one(tmp_path: Path) -> None:
    from quantmill.pipeline.plan import build_plan
    from quantmill.recipe import LoadedRecipe

    cache = tmp_path / "hub"
    adapter = fake_adapter(tmp_path / "adapter")
    put_in_hub_cache(cache, "OWNER/kevin-lora", "main", adapter)
    base = {"source": {"kind": "hub", "id": "meta-llama/Llama-3.1-8B", "revision": "main"}, "gguf": {"types": []}}

    def merge_key(adapters: list[dict[str, Any]]) -> str:
        path = tmp_path / "r.yaml"
        data = {**base, "adapters": adapters}
        return build_plan(LoadedRecipe(path, validate_recipe(data, path), "")).node("merge").key

    import huggingface_hub.constants as hub_constants

    with pytest.MonkeyPatch.context() as mp:
        for key, value in hub_env(cache).items():
            mp.setenv(key, value)
        # huggingface_hub reads its environment once, at import (another test may have imported it already)
        mp.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
        mp.setattr(hub_constants, "HF_HUB_OFFLINE", True)
        hub = merge_key([{"hub": {"id": "OWNER/kevin-lora", "revision": "main"}}])
        local = merge_key([{"path": str(adapter)}])
        assert hub == local
        (adapter / "adapter_model.safetensors").write_bytes(b"changed")
        put_in_hub_cache(cache, "OWNER/kevin-lora", "main", adapter)  # huggingface_hub reads HF_HUB_CACHE once
        assert merge_key([{"hub": {"id": "OWNER/kevin-lora", "revision": "main"}}]) != hub


@pytest.mark.parametrize(("adapter", "message"), [
    ({}, "exactly one of path"),
    ({"path": "a", "hub": {"id": "o/n", "revision": "main"}}, "exactly one of path"),
    ({"hub": {"id": "nope", "revision": "main"}}, "not a Hub repository id"),
    ({"hub": {"id": "o/n"}}, "revision"),
])
def test_bad_adapter_location_is_one_line(adapter: dict[str, Any], message: str) -> None:
    from quantmill.recipe import RecipeError

    with pytest.raises(RecipeError, match=message) as info:
        validate_recipe({"gguf": {}, "adapters": [adapter]}, Path("r.yaml"))
    assert "\n" not in str(info.value) and "adapters.0" in str(info.value)


# ---- tiny replicas


EMBED_SCALE = 4.0


def make_confident(out: Path) -> Path:
    """Scale the token embedding and make the output layer its copy: the replica then predicts its input token with a
    clear margin (a random init predicts almost uniformly, so top-1 agreement would be a coin toss among near-ties,
    which no quantization can be judged by). Shapes, names and dtypes stay as transformers wrote them."""
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(out / "model.safetensors"))
    embed = next(k for k in weights if k.endswith(("embed_tokens.weight", "word_embeddings.weight")))
    weights[embed] = (weights[embed] * EMBED_SCALE).astype(weights[embed].dtype)
    if "lm_head.weight" in weights:
        weights["lm_head.weight"] = weights[embed].copy()
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


ALFRED_BRANCHES = ["gptq-4bit--1g-actorder_True", "gptq-4bit-128g-actorder_True", "gptq-4bit-32g-actorder_True",
                   "gptq-3bit-128g-actorder_True", "gptq-3bit-32g-actorder_True", "gptq-8bit--1g-actorder_True",
                   "gptq-8bit-128g-actorder_True"]


def falcon_40b_replica(out: Path, tokenizer_dir: Path) -> Path:
    """Falcon-40B's layout (GQA, ln_attn + ln_mlp, parallel attention, no biases), 2 layers of width 256."""
    import torch
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    config = FalconConfig(vocab_size=BPE_VOCAB, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                          new_decoder_architecture=True, bos_token_id=1, eos_token_id=2, max_position_embeddings=2048)
    FalconForCausalLM(config).eval().save_pretrained(out)
    for path in sorted(tokenizer_dir.iterdir()):
        shutil.copy(path, out / path.name)
    return make_confident(out)


LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_theta": 500000.0}


def llama31_replica(out: Path, tokenizer_dir: Path) -> Path:
    """Llama 3.1's shape: GQA, head dim 64, untied output, llama3 RoPE scaling in config.json; width 256."""
    build_tiny_llama(out, tokenizer_dir, BPE_VOCAB, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64, max_position_embeddings=131072, tie_word_embeddings=False,
                     initializer_range=0.02, rope_parameters=dict(LLAMA31_ROPE))
    config = json.loads((out / "config.json").read_text())
    assert (config.get("rope_parameters") or config.get("rope_scaling"))["rope_type"] == "llama3", config
    return make_confident(out)


def kevin_adapter(base: Path, out: Path) -> Path:
    """A LoRA trained with PEFT on the replica, saying (as the real one does) it was trained on unsloth's 4-bit upload."""
    from merge_helpers import train_adapter

    train_adapter(base, out, steps=2, r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"])
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "unsloth/Meta-Llama-3.1-8B-bnb-4bit"
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def lckv_replica(out: Path, tokenizer_dir: Path) -> Path:
    from lckv_helpers import build_tiny_lckv

    return make_confident(build_tiny_lckv(out, tokenizer_dir, vocab_size=BPE_VOCAB, max_position_embeddings=2048,
                                          initializer_range=0.02))


FOT_FIELDS = {"mem_layers": [1], "mem_dtype": "bfloat16", "last_context_length": 1024, "mem_attention_grouping": None,
              "torch_attention": False, "gradient_checkpoint_every_ith": 1}


def longllama_replica(out: Path, tokenizer_dir: Path) -> Path:
    """OpenLLaMA-3B's shape (multi-head attention, untied output) with LongLLaMA's config.json; width 256."""
    build_tiny_llama(out, tokenizer_dir, SP_VOCAB_SIZE, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                     num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False, initializer_range=0.02)
    # Like the real repository: only the SentencePiece model (no tokenizer.json); calibration and verify use the
    # fast tokenizer transformers derives from it (quantmill.convert.fast_tokenizer).
    config = json.loads((out / "config.json").read_text())
    config.update(architectures=["LongLlamaForCausalLM"], model_type="longllama", **FOT_FIELDS)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return make_confident(out)


# ---- end to end


def run_example(name: str, tmp_path: Path, cache: Path) -> tuple[dict[str, Any], Path, float]:
    """``quantmill run`` on the shrunk example in a subprocess, checked: (verify.json, release directory, seconds)."""
    root = tmp_path / "run"
    root.mkdir()
    recipe = root / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(shrunk(name), sort_keys=False), encoding="utf-8")
    start = time.monotonic()
    result = cli("run", str(recipe), "--json", "--no-publish", cwd=root, env=hub_env(cache))
    seconds = time.monotonic() - start
    release = root / "work" / "release"
    verify_json = release / "verify" / "verify.json"
    detail = (release / "verify" / "report.md").read_text(encoding="utf-8") if verify_json.is_file() else "(no verify report)"
    assert result.returncode in (0, 1) and verify_json.is_file(), \
        f"{name}: exit {result.returncode} after {seconds:.0f} s\n{result.stderr[-4000:]}\n{detail}"
    verify = json.loads(verify_json.read_text(encoding="utf-8"))
    failed = {a["name"]: a["failures"] for a in verify["artifacts"] if not a["is_reference"] and not a["passed"]}
    assert not failed, f"{name}: {failed}\n{detail}"
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads(result.stdout)["verification_passed"] is True
    assert_release(name, verify, release)
    return verify, release, seconds


def assert_release(name: str, verify: dict[str, Any], release: Path) -> None:
    """Every artifact of the recipe built, measured and carded; the manifest records the verdict verify gave."""
    data = shrunk(name)
    artifacts = {a["name"]: a for a in verify["artifacts"] if not a["is_reference"]}
    names = validate_recipe(data, Path(name)).artifact_names()
    assert sorted(artifacts) == sorted(names)
    assert all(a.get("kld_mean") is not None for a in artifacts.values())
    manifest = json.loads((release / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["verification"]["passed"] is verify["passed"]
    card = data["card"]
    if "gguf" in data:
        readme = (release / "gguf" / "README.md").read_text(encoding="utf-8")
        assert card["base_model"] in readme and card["license"] in readme
        for file_type in [data["gguf"]["base"].upper(), *data["gguf"]["types"]]:
            assert (release / "gguf" / f"{data['name']}-{file_type}.gguf").is_file(), file_type
    if "gptq" in data:
        for branch in [n for n in names if n.startswith("gptq-")]:
            assert (release / "gptq" / branch / "model.safetensors").is_file(), branch
            assert card["base_model"] in (release / "gptq" / branch / "README.md").read_text(encoding="utf-8")


def figures(verify: dict[str, Any]) -> str:
    shown = ("ppl", "delta_ppl_pct", "kld_mean", "kld_p99", "top1_agreement")
    return "; ".join(f"{a['name']}: {json.dumps({k: a[k] for k in shown}, sort_keys=True)}" for a in verify["artifacts"])


@pytest.mark.slow
def test_alfred_example_end_to_end(smollm2_tokenizer_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    data = example_recipe("alfred-40b-1023")
    from families import to_pickle_upload, to_refinedweb_config

    # like the real upload: a RefinedWeb config.json (auto_map code that must never run) and pickle shards only
    model = to_pickle_upload(to_refinedweb_config(falcon_40b_replica(tmp_path / "alfred", smollm2_tokenizer_dir)), 2)
    put_in_hub_cache(cache, data["source"]["id"], data["source"]["revision"], model)
    verify, release, seconds = run_example("alfred-40b-1023", tmp_path, cache)
    assert sorted(p.name for p in (release / "gptq").iterdir() if p.is_dir()) == sorted(ALFRED_BRANCHES)
    baked = json.loads((release / "gptq" / ALFRED_BRANCHES[0] / "config.json").read_text(encoding="utf-8"))
    assert baked["max_position_embeddings"] == 8192
    prompt = data["card"]["prompt_template"]
    assert prompt in (release / "gguf" / "README.md").read_text(encoding="utf-8")
    print(f"alfred-40b-1023: {seconds:.0f} s; {figures(verify)}")


@pytest.mark.slow
def test_kevin_lora_example_end_to_end(smollm2_tokenizer_dir: Path, tmp_path: Path) -> None:
    import gguf

    cache = tmp_path / "hub"
    data = example_recipe("kevin-lora")
    base = llama31_replica(tmp_path / "llama31", smollm2_tokenizer_dir)
    put_in_hub_cache(cache, data["source"]["id"], data["source"]["revision"], base)
    [(adapter_id, adapter_rev)] = hub_repos(data)[1:]
    put_in_hub_cache(cache, adapter_id, adapter_rev, kevin_adapter(base, tmp_path / "adapter"))
    verify, release, seconds = run_example("kevin-lora", tmp_path, cache)
    merged = json.loads((release / "manifest.json").read_text(encoding="utf-8"))["inputs"]
    assert {"adapters/0/adapter_config.json", "adapters/0/adapter_model.safetensors"} <= set(merged)
    reader = gguf.GGUFReader(release / "gguf" / f"{data['name']}-Q4_K_M.gguf")
    assert "rope_freqs.weight" in {t.name for t in reader.tensors}  # Llama 3.1's llama3 RoPE survived the merge
    print(f"kevin-lora: {seconds:.0f} s; {figures(verify)}")


@pytest.mark.slow
def test_lckv_example_end_to_end(smollm2_tokenizer_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    data = example_recipe("lckv-tinyllama-w2")
    model = lckv_replica(tmp_path / "lckv", smollm2_tokenizer_dir)
    put_in_hub_cache(cache, data["source"]["id"], data["source"]["revision"], model)
    verify, release, seconds = run_example("lckv-tinyllama-w2", tmp_path, cache)
    layout = json.loads((model / "config.json").read_text())["layer_types"]
    for branch in ("gptq-4bit-128g-actorder_True", "gptq-8bit--1g-actorder_True"):
        assert json.loads((release / "gptq" / branch / "config.json").read_text())["layer_types"] == layout
    assert {a["format"] for a in verify["artifacts"]} == {"lckv"}
    print(f"lckv-tinyllama-w2: {seconds:.0f} s; {figures(verify)}")


@pytest.mark.slow
def test_long_llama_example_end_to_end(sentencepiece_tokenizer_dir: Path, tmp_path: Path) -> None:
    import gguf

    cache = tmp_path / "hub"
    data = example_recipe("long-llama-3b")
    model = longllama_replica(tmp_path / "longllama", sentencepiece_tokenizer_dir)
    put_in_hub_cache(cache, data["source"]["id"], data["source"]["revision"], model)
    verify, release, seconds = run_example("long-llama-3b", tmp_path, cache)
    fields = gguf.GGUFReader(release / "gguf" / f"{data['name']}-Q4_K_M.gguf").fields
    assert json.loads(fields["longllama.config"].contents()) == FOT_FIELDS
    assert fields["tokenizer.ggml.model"].contents() == "llama"  # SentencePiece
    print(f"long-llama-3b: {seconds:.0f} s; {figures(verify)}")
