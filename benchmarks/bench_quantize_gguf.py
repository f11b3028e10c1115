"""quantize gguf vs llama-quantize: whole-command wall time on the same F16 GGUF, and the outputs' bytes.

Checkpoints: the default model's fp16 reference (SmolLM2-135M-Instruct) and bench_convert.py's random
1.17B llama, each converted once to an F16 GGUF by quantmill (kept in --work). ``quantmill quantize
gguf --type T`` and llama.cpp's ``llama-quantize`` (scripts/llama_cpp_source.sh --build) then run
alternately (--repeat times each on SmolLM2, --repeat-1b on the 1.17B), with their default threads
(every hardware thread) and a warm page cache. Reported: each tool's median wall time (start-up, imports, checks, quantization, summary) and
CPU time (user + system: less sensitive to other jobs on the machine), the ratios, and whether every
pair of outputs was byte-identical. quantmill's modules load from cached
bytecode, as from an installed wheel (under --work, even where PYTHONDONTWRITEBYTECODE is set).

    bash scripts/llama_cpp_source.sh --build
    .venv/bin/python benchmarks/bench_quantize_gguf.py --repeat 5
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

from bench_convert import run_measured, write_random_llama


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/quantmill-bench"), help="shared with bench_convert.py")
    parser.add_argument("--type", default="Q4_K_M")
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool on SmolLM2; the median is reported")
    parser.add_argument("--repeat-1b", type=int, default=1, help="runs per tool on the 1.17B checkpoint (~100 s each)")
    parser.add_argument("--skip-1b", action="store_true", help="only SmolLM2")
    args = parser.parse_args()

    from quantmill.convert.hf_to_gguf import convert_hf_to_gguf
    from quantmill.default_model import default_reference
    from quantmill.reference_tools import llama_cpp_tool

    llama_quantize = llama_cpp_tool("llama-quantize")
    if not llama_quantize.is_file():
        sys.exit(f"{llama_quantize}: not built; run `bash scripts/llama_cpp_source.sh --build`")
    args.work.mkdir(parents=True, exist_ok=True)
    models = [("SmolLM2-135M-Instruct", default_reference(), args.repeat)]
    if not args.skip_1b:
        models.append(("random llama 1.17B", write_random_llama(args.work / "random-1b", default_reference()), args.repeat_1b))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"} | {"PYTHONPYCACHEPREFIX": str(args.work / "pycache")}
    load = lambda: " ".join(f"{x:.2f}" for x in os.getloadavg())  # noqa: E731
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, load average before: {load()}\n")
    print("| F16 GGUF of | type | llama-quantize s | quantmill s | ratio | llama-quantize CPU s | quantmill CPU s | CPU ratio "
          "| runs | identical bytes |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    rows: list[str] = []  # every run's wall time, printed after the table
    for label, checkpoint, repeat in models:
        f16 = args.work / f"{checkpoint.name}-F16.gguf"
        if not f16.is_file():
            convert_hf_to_gguf(checkpoint, "f16", f16, progress=False)
        out = {name: args.work / f"{name}-{args.type}.gguf" for name in ("llama-quantize", "quantmill")}
        commands = {
            "llama-quantize": [str(llama_quantize), str(f16), str(out["llama-quantize"]), args.type],
            "quantmill": [str(Path(sys.executable).with_name("quantmill")), "quantize", "gguf", str(f16),
                          "--type", args.type, "--out", str(out["quantmill"])],
        }
        with f16.open("rb") as f:  # a warm page cache for both
            while f.read(1 << 24):
                pass
        times: dict[str, list[float]] = {name: [] for name in commands}
        cpu: dict[str, list[float]] = {name: [] for name in commands}
        identical = True
        for i in range(repeat):
            runs = {}
            for name in sorted(commands, reverse=i % 2 == 1):  # alternate which tool goes first
                out[name].unlink(missing_ok=True)
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                runs[name] = run_measured(commands[name], out[name], env)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the reaped child's CPU is added here
                times[name].append(runs[name].seconds)
                cpu[name].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
            identical &= runs["quantmill"].sha256 == runs["llama-quantize"].sha256
        (ref, ours), (ref_cpu, our_cpu) = ([statistics.median(d[n]) for n in ("llama-quantize", "quantmill")] for d in (times, cpu))
        print(f"| {label} | {args.type} | {ref:.2f} | {ours:.2f} | {ours / ref:.2f} | {ref_cpu:.2f} | {our_cpu:.2f} | "
              f"{our_cpu / ref_cpu:.2f} | {repeat} | {'yes' if identical else 'NO'} |")
        rows.append(f"{label}: " + "; ".join(f"{n} {' '.join(f'{t:.2f}' for t in times[n])} s" for n in commands))
        for path in out.values():
            path.unlink()
    print("\nwall times, in run order: " + "; ".join(rows) + f"\nload average after: {load()}")


if __name__ == "__main__":
    main()
