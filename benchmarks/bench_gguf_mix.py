"""Budgeted GGUF mixes vs llama.cpp's Q4_K_M and Q3_K_M (with the same importance matrix), on two texts.

1. ``quantmill run`` on a recipe that makes the bundled SmolLM2 reference, its F16 GGUF, the importance
   matrix of the default calibration set (32 × 512 tokens, seed 0) and Q4_K_M / Q3_K_M with it
   (libllama's ``llama_model_quantize``: the same bytes as ``llama-quantize --imatrix``, see
   tests/quantize/test_quantize_gguf.py::test_same_bytes_as_llama_quantize).
2. ``quantmill quantize gguf --target-size`` makes a mix no larger than each of those files, from the same
   F16 GGUF and imatrix: once from the imatrix-weighted errors alone, once ``--refine``d with the gains
   measured on the reference (2 × 256 calibration tokens; measured for the first mix, then reused with
   ``--gains-from``: they do not depend on the budget); the time to choose each mix is timed.
3. ``quantmill verify`` measures all of them on the bundled evaluation text (``--eval-chunks`` chunks of
   512) and on a second text that is in no calibration corpus (``--second-text``, default the GPL-3 text
   every Debian system ships in /usr/share/common-licenses).

With ``--lora-scale S`` the model is SmolLM2 with a random rank-16 LoRA merged into every linear (PEFT adapter
built here with seed 0, its B scaled so that each ‖ΔW‖ is S × ‖W‖): the bundled SmolLM2 is itself a
dequantized Q4_1 GGUF, so its linears are exactly representable in Q4_1, which a fine-tune's are not.

    .venv/bin/python benchmarks/bench_gguf_mix.py --threads 2 --work /tmp/bmix
    .venv/bin/python benchmarks/bench_gguf_mix.py --threads 2 --work /tmp/bmix-lora --lora-scale 0.05
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUANTMILL = [sys.executable, "-m", "quantmill.cli"]
RECIPE = """name: SmolLM2-135M-Instruct
source: bundled
calibration: {corpus: bundled, samples: 32, seqlen: 512, seed: 0}
gguf: {base: f16, types: [Q4_K_M, Q3_K_M], imatrix: true}
verify: null  # measured below, on both texts
work_dir: work
output: release
threads: %d
"""
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_lora(reference: Path, out: Path, scale: float) -> Path:
    """A PEFT LoRA adapter (rank 16, seed 0) for ``reference`` whose ΔW = B·A·α/r has ‖ΔW‖ = scale·‖W‖ per linear."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32, use_safetensors=True)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=LORA_TARGETS,
                                                  init_lora_weights=False, lora_dropout=0.0))
    with torch.no_grad():
        for module in peft_model.modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                delta = (b @ a) * module.scaling["default"]
                b.mul_(scale * module.base_layer.weight.norm() / delta.norm())
    peft_model.save_pretrained(out)
    return out


def run(cmd: list[str], cwd: Path | None = None) -> tuple[str, float]:
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=cwd)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-chunks", type=int, default=32)
    parser.add_argument("--second-text", type=Path, default=Path("/usr/share/common-licenses/GPL-3"))
    parser.add_argument("--work", type=Path, help="keep the files here [default: a temporary directory]")
    parser.add_argument("--lora-scale", type=float, default=None, help="merge a random LoRA of this relative size first")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-mix-"))
    work.mkdir(parents=True, exist_ok=True)
    recipe = RECIPE % args.threads
    if args.lora_scale is not None:
        from quantmill.default_model import default_reference

        adapter = work / "adapter"
        if not (adapter / "adapter_config.json").exists():
            random_lora(default_reference(), adapter, args.lora_scale)
        recipe += f"adapters: [{{path: {adapter}}}]\n"
    (work / "recipe.yaml").write_text(recipe, encoding="utf-8")
    run([*QUANTMILL, "run", "recipe.yaml"], cwd=work)
    stages = work / "work" / "stages"
    base = next(stages.glob("gguf-base-*/*-F16.gguf"))
    imatrix = next(stages.glob("imatrix-*/imatrix.gguf"))
    reference = next(p for p in stages.glob("merge-*/*" if args.lora_scale is not None else "source-*/*") if p.is_dir())
    files = {t: next(stages.glob(f"gguf-{t}-*/*-{t}.gguf")) for t in ("Q4_K_M", "Q3_K_M")}
    chosen: dict[str, float] = {}
    for peer, path in list(files.items()):
        for refine in (False, True):
            name = f"QM-{peer}-size" + ("-refined" if refine else "")
            out = work / f"{name}.gguf"
            out.unlink(missing_ok=True)
            cmd = [*QUANTMILL, "quantize", "gguf", str(base), "--imatrix", str(imatrix), "--target-size",
                   str(path.stat().st_size), "--mix-name", name, "--out", str(out), "--threads", str(args.threads),
                   "--report", str(work / f"{name}.json")]
            first = work / "QM-Q4_K_M-size-refined.json"  # gains do not depend on the budget: measured once
            extra = (["--gains-from", str(first)] if peer != "Q4_K_M" else ["--refine", str(reference)]) if refine else []
            stdout, _ = run([*cmd, *extra])
            chosen[name] = json.loads((work / f"{name}.json").read_text())["seconds_to_choose"]
            print(stdout.splitlines()[0], flush=True)
            files[name] = out
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for label, text, chunks in (("eval", Path(__file__).resolve().parents[1] / "calib_data/corpora/eval_text.txt",
                                 args.eval_chunks), ("second", args.second_text, None)):
        report = work / f"verify-{label}.json"
        run([*QUANTMILL, "verify", "--reference", str(reference), "--text", str(text), "--threads", str(args.threads),
             "--json", str(report), *(["--max-chunks", str(chunks)] if chunks else []), *map(str, files.values())])
        for record in json.loads(report.read_text())["artifacts"]:
            rows.setdefault(Path(record["path"]).name, {})[label] = record
    print("| file | size (bytes) | bpw | text | ppl | mean KLD | p99 KLD | same top % | time to choose s |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for name, path in files.items():
        for label in ("eval", "second"):
            r = rows.get(path.name, {}).get(label)
            if r is None:
                continue
            print(f"| {path.name} | {path.stat().st_size} | {r['bpw']:.3f} | {label} | {r['ppl']:.4f} | {r['kld_mean']:.5f} "
                  f"| {r['kld_p99']:.5f} | {100 * r['top1_agreement']:.2f} | {chosen.get(name, '')} |")
    print(json.dumps({"work": str(work), "rows": rows}, default=str)[:200])


if __name__ == "__main__":
    main()
