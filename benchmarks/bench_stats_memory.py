"""Peak RSS of the statistics pass: a random 32-layer llama against an 8-layer one of the same width.

The pass keeps one decoder layer and the calibration activations in memory, so its peak
must not grow with depth. Each measurement runs in a fresh subprocess (``ru_maxrss``);
the random checkpoints are bench_convert.py's (one shard per layer).

    python benchmarks/bench_stats_memory.py                  # SmolLM2 width (576 / 1536), 16 x 512 tokens
    python benchmarks/bench_stats_memory.py --layers 8 32 --hidden 1024 --intermediate 2816

Prints one JSON line per model and a verdict line (32-layer peak within 10% of 8-layer peak).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_convert import write_random_llama

WORKER = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np
import torch
torch.set_num_threads(int(sys.argv[5]))
from quantmill.calib_data.sampling import sample_from_stream
from quantmill.quantize.gguf.imatrix import imatrix_from_stats, write_imatrix
from quantmill.quantize.stats import collect_importance
model, samples, seqlen = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
vocab = json.loads((model / "config.json").read_text())["vocab_size"]
stream = np.random.Generator(np.random.PCG64(0)).integers(0, vocab, size=samples * seqlen * 2, dtype=np.int32)
calib = sample_from_stream(stream, "random", samples, seqlen, seed=0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
stats = collect_importance(model, calib, progress=False)
write_imatrix(imatrix_from_stats(stats, calib), Path(sys.argv[4]))
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "peak_before_pass_mb": before / 1024, "seconds": time.perf_counter() - start}))
"""

def run_python(code: str, *args: str) -> str:
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"subprocess failed:\n{result.stderr[-3000:]}")
    return result.stdout


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """The depths and the width of the random llamas, the calibration size, threads and the verdict's tolerance."""
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=0.10)


def depth_sweep(args: argparse.Namespace, worker: str, worker_args: Callable[[Path], list[str]], fields: dict[str, Any]) -> None:
    """Per --layers depth, a random llama of that depth and ``worker`` run on it in a fresh process (one JSON line each);
    then the verdict: the deepest one's peak RSS within --tolerance of the shallowest one's (exit 1 if not)."""
    results: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        for layers in args.layers:
            model = Path(tmp) / f"random-{layers}"
            shape = {"hidden_size": args.hidden, "intermediate_size": args.intermediate, "num_hidden_layers": layers,
                     "num_attention_heads": args.hidden // 64, "num_key_value_heads": max(1, args.hidden // 192), "vocab_size": args.vocab}
            write_random_llama(model, None, shape=shape, tie_word_embeddings=True)
            size_mb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
            started = time.perf_counter()
            out = run_python(worker, *worker_args(model))
            row = {"layers": layers, "hidden": args.hidden, "intermediate": args.intermediate, "checkpoint_mb": round(size_mb, 1),
                   "samples": args.samples, "seqlen": args.seqlen, **fields, **json.loads(out),
                   "wall_s": round(time.perf_counter() - started, 1)}
            results[layers] = row
            print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    lo, hi = min(results), max(results)
    ratio = results[hi]["peak_rss_mb"] / results[lo]["peak_rss_mb"]
    verdict = "PASS" if ratio <= 1 + args.tolerance else "FAIL"
    print(f"{verdict}: peak RSS {hi} layers / {lo} layers = {ratio:.3f} (limit {1 + args.tolerance:.2f})")
    if verdict == "FAIL":
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_arguments(parser)
    args = parser.parse_args()
    depth_sweep(args, WORKER, lambda model: [str(model), str(args.samples), str(args.seqlen), str(model / "imatrix.gguf"),
                                             str(args.threads)], {})


if __name__ == "__main__":
    main()
