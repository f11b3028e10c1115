"""Model cards (README.md) for a release's GPTQ repository and GGUF repository.

Everything in a card's tables is read from the finished artifacts (quantize_config.json and file
sizes of each GPTQ branch, the GGUF files' headers) and from verify's one report
(:mod:`quantmill.verify.report`), never from the recipe's intentions. Hub metadata goes into the YAML front matter.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from quantmill.jsonio import read_json_object

GPTQ_DIR = "gptq"
GGUF_DIR = "gguf"
README = "README.md"
PLOT = "parity.png"
RAM_CONTEXT_TOKENS = 2048
RAM_OVERHEAD_BYTES = 64 * 2**20


@dataclass(frozen=True)
class GptqBranchInfo:
    name: str  # release name, e.g. gptq-4bit-128g-actorder_True
    bits: int
    group_size: int
    desc_act: bool
    damp_percent: float
    dataset: str
    seqlen: int
    size_bytes: int
    format: str = "gptq"  # checkpoint layout: gptq (v1) or compressed-tensors
    sym: bool = True
    grid: str = "minmax"  # how each group's scale/zero was chosen (quantmill.quantize.gptq.grid)
    grid_shrink_range: tuple[float, float] | None = None  # the mse search's range of shrink factors
    grid_steps: int | None = None

    @property
    def grid_label(self) -> str:
        """The card's Grid cell: ``min/max``, or ``mse (0.2–1, 80 steps)``."""
        if self.grid == "minmax":
            return "min/max"
        if self.grid_shrink_range is None or self.grid_steps is None:
            return self.grid
        low, high = self.grid_shrink_range
        return f"{self.grid} ({low:g}–{high:g}, {self.grid_steps} steps)"

    def clients(self, model_type: str | None) -> list[str]:
        """Runtimes whose documented support covers this branch's format, bit width and symmetry."""
        from quantmill.convert.arch.llama import LlamaArchitecture

        if self.format == "compressed-tensors":
            return ["transformers + compressed-tensors", "vLLM"]
        four_bit = self.bits == 4 and self.sym
        return ["transformers + GPTQModel", *(["vLLM"] if self.sym else []), *(["TGI"] if four_bit else []),
                *(["ExLlama"] if four_bit and model_type in LlamaArchitecture.model_types else [])]


FORMAT_LABELS = {"gptq": "GPTQ (v1)", "compressed-tensors": "compressed-tensors"}
# llama.cpp's pull request that taught it a pre-tokenizer (tokenizer.ggml.pre); the key itself came with #6920
PRE_TOKENIZER_SINCE = {"llama-bpe": "PR #6920, April 2024", "smollm": "PR #8609, July 2024"}
LLAMA_CPP_FRONTENDS = "llama-cpp-python, LM Studio, Ollama, text-generation-webui (llama.cpp loader) and koboldcpp"


@dataclass(frozen=True)
class GgufFileInfo:
    file: str
    type_name: str
    bpw: float
    size_bytes: int
    max_ram_bytes: int
    description: str
    version: int = 3  # what the file itself says: GGUF version, architecture, pre-tokenizer, tensor types
    architecture: str = ""
    pre_tokenizer: str = ""
    tensor_types: tuple[str, ...] = ()


@dataclass(frozen=True)
class CardSettings:
    name: str
    creator: str
    base_model: str | None
    quantized_by: str
    license: str
    prompt_template: str
    tags: tuple[str, ...]

    @classmethod
    def from_recipe(cls, recipe: dict[str, Any], release_name: str) -> CardSettings:
        card = recipe["card"]
        return cls(card.get("name") or release_name, card["creator"], card.get("base_model"), card["quantized_by"],
                   card["license"], card["prompt_template"], tuple(card.get("tags", [])))


def read_gptq_branch(directory: Path) -> GptqBranchInfo:
    """The branch's settings from its own files: quantize_config.json (v1) or quantmill_gptq.json (compressed-tensors)."""
    v1 = directory / "quantize_config.json"
    qconfig = read_json_object(v1 if v1.is_file() else directory / "quantmill_gptq.json", "re-run the gptq stage")
    calibration = qconfig.get("meta", {}).get("calibration", {})
    size = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    shrink = qconfig.get("grid_shrink_range")
    steps = qconfig.get("grid_steps")
    return GptqBranchInfo(directory.name, int(qconfig["bits"]), int(qconfig["group_size"]), bool(qconfig["desc_act"]),
                          float(qconfig["damp_percent"]), str(calibration.get("source", "unknown")),
                          int(calibration.get("seqlen", 0)), size, str(qconfig.get("format", "gptq")),
                          bool(qconfig.get("sym", True)), str(qconfig.get("grid", "minmax")),
                          (float(shrink[0]), float(shrink[1])) if shrink else None, int(steps) if steps else None)


def kv_cache_bytes(model: dict[str, Any]) -> int:
    """f16 K and V for RAM_CONTEXT_TOKENS tokens, from the manifest's model record."""
    return 2 * model["n_layers"] * model["n_kv_heads"] * model["head_dim"] * RAM_CONTEXT_TOKENS * 2


def model_record(config: dict[str, Any]) -> dict[str, Any]:
    """What a card needs of the model's config.json (hyperparameters for the RAM estimate)."""
    heads = int(config.get("num_attention_heads", 1))
    width = int(config.get("hidden_size", 0))
    return {"model_type": config.get("model_type"), "n_layers": int(config.get("num_hidden_layers", 0)),
            "n_kv_heads": int(config.get("num_key_value_heads", heads)),
            "head_dim": int(config.get("head_dim") or width // max(heads, 1)), "hidden_size": width}


def read_gguf_file(path: Path, model: dict[str, Any], report: dict[str, Any] | None) -> GgufFileInfo:
    """Figures of one GGUF file: bpw as verify measured it (read from the file when not verified)."""
    from quantmill.quantize.gguf.inspect import summarize_gguf
    from quantmill.quantize.gguf.mix import KEY_PREFIX as MIX_KEY_PREFIX
    from quantmill.quantize.gguf.types import FILE_TYPES, FLOAT_TYPES

    summary = summarize_gguf(path)
    mix = read_mix_keys(path) if any(k.startswith(MIX_KEY_PREFIX) for k in summary.keys) else {}
    type_name = mix.get("name") or path.stem.rsplit("-", 1)[-1].upper()
    measured = _verdicts(report).get(type_name)
    size = path.stat().st_size
    row = FILE_TYPES.get(type_name)
    description = row.description if row else ""
    if mix:
        types = ", ".join(sorted(t for t in summary.by_type if t not in FLOAT_TYPES))
        chosen = ("imatrix-weighted error x the KLD each tensor causes alone" if mix.get("method", "").endswith("kld-gain")
                  else "imatrix-weighted error")
        predicted = mix.get("predicted", "")
        description = (f"quantmill mix for {mix.get('target', '?')}: each tensor's type ({types}) chosen by a knapsack "
                       f"over its measured {chosen}" + (f"; predicted mean KLD {predicted.split()[1]}"
                                                        if predicted.startswith("kld ") else ""))
    return GgufFileInfo(path.name, type_name, float(measured["bpw"]) if measured is not None else summary.bpw, size,
                        size + kv_cache_bytes(model) + RAM_OVERHEAD_BYTES, description,
                        summary.version, summary.architecture, summary.pre_tokenizer, tuple(summary.by_type))


def read_mix_keys(path: Path) -> dict[str, str]:
    """A budgeted mix's ``quantmill.mix.*`` keys (name, target, method), without the prefix."""
    from quantmill.convert.gguf_reader import GGUFFile
    from quantmill.quantize.gguf.mix import KEY_PREFIX as MIX_KEY_PREFIX

    gguf_file = GGUFFile.open(path)
    return {key.removeprefix(MIX_KEY_PREFIX): gguf_file.get_str(key) for key in gguf_file.keys() if key.startswith(MIX_KEY_PREFIX)}


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def front_matter(settings: CardSettings, kind: str) -> str:
    meta: dict[str, Any] = {}
    if settings.base_model:
        meta["base_model"] = settings.base_model
        meta["base_model_relation"] = "quantized"
    meta |= {
        "inference": False,
        "license": settings.license,
        "model_creator": settings.creator,
        "model_name": settings.name,
        "prompt_template": settings.prompt_template,
        "quantized_by": settings.quantized_by,
        "tags": [kind.lower(), "quantmill", *settings.tags],
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000) + "---\n"


def _verdicts(report: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in (report or {}).get("artifacts", [])}


def _measured(name: str, report: dict[str, Any] | None) -> str:
    art = _verdicts(report).get(name)
    if art is None:
        return "not verified"
    delta = art.get("delta_ppl_pct")
    text = f"Δppl {delta:+.2f}%" if delta is not None else "Δppl n/a"
    return text + (", passed" if art.get("passed") else ", FAILED verification")


def _parity(report: dict[str, Any] | None, names: list[str]) -> str:
    from quantmill.verify.report import REFERENCE_NAME, parity_table

    if report is None:
        return "No verification was run for this release."
    keep = {REFERENCE_NAME, *names}
    shown = {**report, "artifacts": [a for a in report["artifacts"] if a["name"] in keep]}
    return parity_table(shown) + f"\n\n![Parity with the fp16 reference]({PLOT})"


def _prompt(settings: CardSettings) -> str:
    return f"## Prompt template\n\n```\n{settings.prompt_template}\n```\n"


def gptq_card(settings: CardSettings, branches: list[GptqBranchInfo], published: dict[str, str],
              report: dict[str, Any] | None, repo_id: str, this_branch: str, model_type: str | None = None) -> str:
    """README.md of a GPTQ repository; ``published`` maps release names to the branch each is pushed to."""
    rows = ["| Branch | Bits | GS | Act Order | Damp % | Grid | GPTQ Dataset | Seq Len | Size | ExLlama | Format | Runs in "
            "| Desc |",
            "| ------ | ---- | -- | --------- | ------ | ---- | ------------ | ------- | ---- | ------- | ------ | ------- "
            "| ---- |"]
    for b in branches:
        clients = b.clients(model_type)
        group = "None" if b.group_size == -1 else str(b.group_size)
        desc = (f"{b.bits}-bit, {'with' if b.desc_act else 'without'} Act Order, "
                f"{'no grouping' if b.group_size == -1 else f'group size {b.group_size}g'}; {_measured(b.name, report)}")
        rows.append(f"| [{published[b.name]}](https://huggingface.co/{repo_id}/tree/{published[b.name]}) | {b.bits} | {group} "
                    f"| {'Yes' if b.desc_act else 'No'} | {b.damp_percent:g} | {b.grid_label} | {b.dataset} | {b.seqlen} "
                    f"| {_size(b.size_bytes)} "
                    f"| {'Yes' if 'ExLlama' in clients else 'No'} | {FORMAT_LABELS.get(b.format, b.format)} "
                    f"| {', '.join(clients)} | {desc} |")
    example = next((published[b.name] for b in branches if published[b.name] != "main"), this_branch)
    return "\n".join([
        front_matter(settings, "GPTQ"),
        f"# {settings.name} — GPTQ",
        "",
        f"GPTQ quantizations of [{settings.name}](https://huggingface.co/{settings.base_model})"
        if settings.base_model else f"GPTQ quantizations of {settings.name}",
        f"by {settings.creator}, made and verified with quantmill. This branch: `{this_branch}`.",
        "",
        "## Provided files",
        "",
        "Each variant is a separate branch (sizes and settings read from the files themselves). Runs in: the "
        "runtimes whose documented support covers the branch's format, bit width and symmetry.",
        "",
        *rows,
        "",
        "## How to download a branch",
        "",
        "```bash",
        f"git clone --single-branch --branch {example} https://huggingface.co/{repo_id}",
        f"huggingface-cli download {repo_id} --revision {example} --local-dir {settings.name}-GPTQ",
        "```",
        "",
        f'In Python: `AutoModelForCausalLM.from_pretrained("{repo_id}", revision="{example}")`.',
        "",
        _prompt(settings),
        "## Parity with the fp16 reference",
        "",
        _parity(report, [b.name for b in branches]),
        "",
    ])


def _gguf_runtimes(files: list[GgufFileInfo]) -> list[str]:
    """Where the files run, from their own keys: the llama.cpp they need, and what bundles llama.cpp."""
    from importlib.metadata import version

    if not files:
        return []
    first = files[0]
    types = sorted({t for f in files for t in f.tensor_types})
    pre = first.pre_tokenizer
    needs = (f"knows the pre-tokenizer `{pre}` (" + PRE_TOKENIZER_SINCE.get(pre, "see llama.cpp's `llama-vocab.cpp`") + ")"
             if pre else f"reads GGUF v{first.version} and architecture `{first.architecture}`")
    return ["## Where these files run", "",
            f"The files themselves say: GGUF v{first.version}, architecture `{first.architecture}`"
            + (f", pre-tokenizer `{pre}`" if pre else "") + f", tensor types {', '.join(types)}. They need a llama.cpp "
            f"that {needs}, and run in what bundles such a llama.cpp: {LLAMA_CPP_FRONTENDS}. Made and checked with "
            f"the llama.cpp of llama-cpp-python {version('llama-cpp-python')}.", ""]


def gguf_card(settings: CardSettings, files: list[GgufFileInfo], report: dict[str, Any] | None, repo_id: str) -> str:
    """README.md of a GGUF repository (every file on main)."""
    rows = ["| Name | Quant method | Bits | Size | Max RAM required | Use case |",
            "| ---- | ------------ | ---- | ---- | ---------------- | -------- |"]
    for f in files:
        rows.append(f"| [{f.file}](https://huggingface.co/{repo_id}/blob/main/{f.file}) | {f.type_name} | {f.bpw:.2f} "
                    f"| {_size(f.size_bytes)} | {_size(f.max_ram_bytes)} | {f.description}; {_measured(f.type_name, report)} |")
    example = files[-1].file if files else f"{settings.name}-Q4_K_M.gguf"
    return "\n".join([
        front_matter(settings, "GGUF"),
        f"# {settings.name} — GGUF",
        "",
        (f"GGUF files of {settings.name} by {settings.creator} for llama.cpp, made with quantmill "
         "(quantized by libllama, with an importance matrix from the calibration set where the recipe asks)."),
        "",
        "## Provided files",
        "",
        ("Bits are the measured bits per weight of the tensor data. Max RAM: file size plus an f16 KV cache "
         f"of {RAM_CONTEXT_TOKENS} tokens plus {RAM_OVERHEAD_BYTES // 2**20} MiB, without GPU offload."),
        "",
        *rows,
        "",
        *_gguf_runtimes(files),
        "## How to download a file",
        "",
        "```bash",
        f"huggingface-cli download {repo_id} {example} --local-dir .",
        "```",
        "",
        _prompt(settings),
        "## Parity with the fp16 reference",
        "",
        _parity(report, [f.type_name for f in files]),
        "",
    ])
