"""The cost model's peak-memory prediction of every stage against its measured peak RSS, on models of growing size.

For each random llama (SmolLM2's tokenizer and vocabulary; shapes below), a release recipe (calibration,
two GPTQ branches, f16 GGUF, imatrix, Q4_K_M, verify) is run once to the end; then each stage is run
again alone, in a child process (as a Ray worker would run it), and that child's peak RSS (``VmHWM``: a
forked child's ``ru_maxrss`` starts at its parent's) is set beside the stage's ``estimated_memory`` from ``quantmill run --dry-run``'s plan.

    .venv/bin/python benchmarks/bench_memory_model.py --work /tmp/quantmill-memory
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from bench_convert import write_random_llama

SHAPES = {
    "h256-l4": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": 49152},
    "h768-l8": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 12,
                "num_key_value_heads": 4, "vocab_size": 49152},
    "h1536-l8": {"hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 8, "num_attention_heads": 12,
                 "num_key_value_heads": 4, "vocab_size": 49152},
}
CHILD = r"""
import resource, sys
from pathlib import Path
from quantmill.pipeline.executors.node import run_node, set_threads
from quantmill.pipeline.plan import build_plan
from quantmill.recipe_load import load_recipe
loaded = load_recipe(Path(sys.argv[1]))
plan = build_plan(loaded)
set_threads(loaded.recipe.threads)
run_node(plan, plan.node(sys.argv[2]), loaded.work_dir, False)
status = Path("/proc/self/status").read_text()
print(int(status.split("VmHWM:")[1].split()[0]) * 1024)  # this process's own peak RSS (ru_maxrss keeps the parent's)
"""


def recipe(model: Path, samples: int) -> dict[str, object]:
    return {"name": "bench", "source": {"kind": "local", "path": str(model)},
            "calibration": {"corpus": "bundled", "samples": samples, "seqlen": 512, "seed": 0},
            "gptq": {"branches": [{"bits": 4, "group_size": 128, "main": True}, {"bits": 8, "group_size": 128}]},
            "gguf": {"base": "f16", "types": ["Q4_K_M"], "imatrix": True, "vocab_pre": "smollm"},
            "verify": {"n_ctx": 512, "max_chunks": 4, "use_default_thresholds": False,
                       "thresholds": {"max_delta_ppl_pct": 1000.0}},
            "card": {"creator": "bench", "base_model": "bench/random", "license": "apache-2.0"},
            "work_dir": "work", "threads": 2}


def peak_rss(recipe_path: Path, stage: str) -> tuple[int, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, str(recipe_path), stage], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"stage {stage} failed:\n{done.stderr[-3000:]}")
    return int(done.stdout.strip().splitlines()[-1]), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/quantmill-memory"))
    parser.add_argument("--samples", type=int, default=64, help="calibration sequences of 512 tokens")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--stages", nargs="*", default=None, help="measure only these stages (default: all)")
    parser.add_argument("--measured", type=Path, default=None,
                        help="a memory-model.json of an earlier run: print today's predictions beside its measurements")
    args = parser.parse_args()

    from quantmill.default_model import default_reference
    from quantmill.pipeline.runner import prepare, run_recipe
    from quantmill.recipe_load import load_recipe

    tokenizer = default_reference()
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; "
          f"calibration {args.samples} x 512 tokens\n")
    print("| model | params | stage | predicted peak | measured peak RSS | predicted / measured | stage s |")
    print("|---|---:|---|---:|---:|---:|---:|")
    results = []
    for name in args.shapes:
        root = args.work / name
        root.mkdir(parents=True, exist_ok=True)
        model = write_random_llama(root / "model", tokenizer, shape=SHAPES[name])
        path = root / "release.yaml"
        path.write_text(yaml.safe_dump(recipe(model, args.samples), sort_keys=False), encoding="utf-8")
        loaded = load_recipe(path)
        plan, report = prepare(loaded)
        if args.measured is not None:
            earlier = {(r["model"], r["stage"]): r for r in json.loads(args.measured.read_text(encoding="utf-8"))}
            for row in report.stages:
                was = earlier[(name, row["stage"])]
                ratio = row["estimated_memory"] / was["measured"]
                print(f"| {name} | {_params(model)} | {row['stage']} | {row['estimated_memory'] / 1e6:,.0f} MB | "
                      f"{was['measured'] / 1e6:,.0f} MB | {ratio:.2f} | {was['seconds']:.1f} |")
            continue
        run_recipe(loaded, publish=False, force=True)
        for row in report.stages:
            if args.stages is not None and row["stage"] not in args.stages:
                continue
            node = plan.node(row["stage"])
            done = node.directory(loaded.work_dir)
            kept = done.with_name(done.name + ".kept")
            shutil.rmtree(kept, ignore_errors=True)
            done.rename(kept)
            try:
                measured, seconds = peak_rss(path, node.name)
            finally:
                shutil.rmtree(done, ignore_errors=True)
                kept.rename(done)
            predicted = row["estimated_memory"]
            ratio = predicted / measured if predicted else float("nan")
            results.append({"model": name, "stage": node.name, "predicted": predicted, "measured": measured,
                            "ratio": round(ratio, 3), "seconds": round(seconds, 1)})
            print(f"| {name} | {_params(model)} | {node.name} | {predicted / 1e6:,.0f} MB | {measured / 1e6:,.0f} MB | "
                  f"{ratio:.2f} | {seconds:.1f} |", flush=True)
    if args.measured is None:
        out = args.work / "memory-model.json"
        kept = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else []
        fresh = {(r["model"], r["stage"]) for r in results}
        merged = [r for r in kept if (r["model"], r["stage"]) not in fresh] + results
        out.write_text(json.dumps(merged, indent=1) + "\n", encoding="utf-8")


def _params(model: Path) -> str:
    from quantmill.convert.safetensors_io import tensor_entries

    n = sum(e.n_elements for e in tensor_entries(sorted(model.glob("*.safetensors"))))
    return f"{n / 1e6:,.0f}M"


if __name__ == "__main__":
    main()
