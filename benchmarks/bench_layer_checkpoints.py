"""What layer checkpoints and spilling cost: GPTQ of the default model without them, with a checkpoint after every
decoder layer, and with its activation streams spilled to disk under a memory budget (checkpoints on as well).

Each variant runs in its own child process (wall time, peak RSS from VmHWM, bytes identical to the plain run). The
SmolLM2-135M reference, the bundled calibration corpus, branches 4bit-128g-actorder and 8bit-128g.

    .venv/bin/python benchmarks/bench_layer_checkpoints.py --samples 32
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
from pathlib import Path
args = json.loads(sys.argv[1])
from quantmill.calib_data.sampling import load_calibration_set
from quantmill.quantize.gptq.branches import parse_branches
from quantmill.quantize.gptq.engine import EngineOptions, quantize_branches
calib = load_calibration_set(Path(args["calibration"]))
started = time.perf_counter()
quantize_branches(Path(args["model"]), calib, parse_branches(args["branches"]), Path(args["out"]), EngineOptions(
    progress=False, checkpoint_dir=Path(args["checkpoints"]) if args["checkpoints"] else None, max_memory=args["budget"]))
seconds = time.perf_counter() - started
hwm = int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"seconds": seconds, "peak_rss": hwm}))
"""
BRANCHES = ["4bit-128g-actorder", "8bit-128g"]


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(path.relative_to(directory).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/quantmill-checkpoints"))
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--budget", default="700MB", help="the memory budget of the spilled variant")
    parser.add_argument("--only", nargs="*", default=None, help="run only these variants (the plain run's output is reused)")
    args = parser.parse_args()

    from quantmill.calib_data.sampling import save_calibration_set
    from quantmill.convert.safetensors_io import parse_size
    from quantmill.default_model import default_reference
    from quantmill.quantize.calibrate import prepare_calibration

    model = default_reference()
    if args.only is None:
        shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    calib = prepare_calibration(model, "bundled", args.samples, 512, 0, progress=False)
    save_calibration_set(calib, args.work / "calibration")
    stream = calib.samples * calib.seqlen * 576 * 4
    variants = {"plain": (False, None), "checkpoints": (True, None), "checkpoints + spilled": (True, parse_size(args.budget))}
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; SmolLM2-135M, "
          f"{calib.samples} x 512 tokens, branches {', '.join(BRANCHES)}; one stream {stream / 1e6:.1f} MB, "
          f"checkpointed after each of 29 layers\n")
    print("| variant | seconds | vs plain | peak RSS MB | same bytes |\n|---|---:|---:|---:|---|")
    first: dict[str, float] = {}
    reference = None
    for name, (checkpoints, budget) in variants.items():
        out = args.work / name.replace(" + ", "-")
        if args.only is not None and name not in args.only:
            reference = reference or (digest(out) if name == "plain" else None)
            continue
        shutil.rmtree(out, ignore_errors=True)
        job = {"model": str(model), "calibration": str(args.work / "calibration"), "branches": BRANCHES, "out": str(out),
               "checkpoints": str(args.work / "ck") if checkpoints else None, "budget": budget}
        done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(done.stderr[-3000:])
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        reference = reference or digest(out)
        if name == "plain":
            first["plain"] = figures["seconds"]
        ratio = f"{figures['seconds'] / first['plain']:.2f}" if "plain" in first else "–"
        print(f"| {name} | {figures['seconds']:.1f} | {ratio} | "
              f"{figures['peak_rss'] / 1e6:,.0f} | {digest(out) == reference} |", flush=True)


if __name__ == "__main__":
    main()
