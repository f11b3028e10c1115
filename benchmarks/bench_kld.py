"""KL divergence and top-1 agreement: quantmill verify vs ``llama-perplexity --kl-divergence``, same files.

Two bases, each used by both tools on the same GGUF files, text, n_ctx and chunk count:

* ``quantmill`` — the fp16 reference in torch, stored by ``quantmill verify --reference-logprobs``
  in llama-perplexity's ``--kl-divergence-base`` format, then read by both tools;
* ``llama.cpp`` — the f16 GGUF run by ``llama-perplexity --kl-divergence-base`` (its own
  tokenization of the text), then read by both tools.

For each (base, GGUF) the script prints mean KLD, 99th-percentile KLD and same-top % from
each tool and their ratios. Build llama-perplexity first (benchmark only):

    bash scripts/llama_cpp_source.sh --build
    .venv/bin/quantmill default-release --out release          # or any directory of GGUFs
    .venv/bin/python benchmarks/bench_kld.py --release release --threads 2
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path

from quantmill.reference_tools import llama_cpp_tool

PATTERNS = {
    "kld_mean": re.compile(r"Mean\s+KLD:\s+([0-9.eE+-]+)"),
    "kld_p99": re.compile(r"99\.0%\s+KLD:\s+([0-9.eE+-]+)"),
    "top1_pct": re.compile(r"Same top p:\s+([0-9.]+)"),
}


def llama_perplexity(tool: Path, args: list[str]) -> str:
    done = subprocess.run([str(tool), *args], capture_output=True, text=True, check=False)
    log = done.stdout + done.stderr
    if done.returncode != 0:
        raise SystemExit(f"llama-perplexity {' '.join(args)} failed:\n{log[-2000:]}")
    return log


def theirs(tool: Path, gguf: Path, base: Path, n_ctx: int, threads: int) -> dict[str, float]:
    log = llama_perplexity(tool, ["-m", str(gguf), "--kl-divergence-base", str(base), "--kl-divergence",
                                  "-c", str(n_ctx), "-t", str(threads), "-tb", str(threads)])
    out = {}
    for name, pattern in PATTERNS.items():
        match = pattern.search(log)
        if match is None:
            raise SystemExit(f"{name} missing from llama-perplexity's output:\n{log[-2000:]}")
        out[name] = float(match.group(1))
    return out


def ours(ggufs: list[Path], reference: Path, text: Path, n_ctx: int, chunks: int, threads: int,
         base: Path) -> dict[Path, dict[str, float]]:
    from quantmill.verify.backends.base import BackendOptions
    from quantmill.verify.evaluate import verify_artifacts
    from quantmill.verify.thresholds import DEFAULT_THRESHOLDS

    result = verify_artifacts(ggufs, reference, text, n_ctx, BackendOptions(threads=threads), max_chunks=chunks,
                              store=base, thresholds=DEFAULT_THRESHOLDS)
    return {a.path: {"kld_mean": a.metrics["kld_mean"], "kld_p99": a.metrics["kld_p99"],
                     "top1_pct": 100 * a.metrics["top1_agreement"], "seconds": a.seconds} for a in result.artifacts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", type=Path, required=True, help="directory with the default release's GGUFs")
    parser.add_argument("--reference", type=Path, help="fp16 reference checkpoint [default: quantmill's default model]")
    parser.add_argument("--text", type=Path, help="evaluation text [default: the bundled evaluation text]")
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-perplexity", type=Path, default=llama_cpp_tool("llama-perplexity"))
    args = parser.parse_args()

    from quantmill.calib_data.bundled import eval_file
    from quantmill.default_model import default_reference

    reference = args.reference or default_reference()
    text = args.text or eval_file()
    ggufs = sorted(args.release.glob("*.gguf"))
    f16 = next(g for g in ggufs if g.name.endswith("-F16.gguf"))
    quantized = [g for g in ggufs if g != f16]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_kld_") as tmp:
        quantmill_base = Path(tmp) / "quantmill-base.kld"
        llama_base = Path(tmp) / "llama-base.kld"
        started = time.perf_counter()
        mine = ours(ggufs, reference, text, args.n_ctx, args.chunks, args.threads, quantmill_base)
        llama_perplexity(args.llama_perplexity, ["-m", str(f16), "-f", str(text), "-c", str(args.n_ctx), "--chunks",
                                                 str(args.chunks), "-t", str(args.threads), "-tb", str(args.threads),
                                                 "--kl-divergence-base", str(llama_base)])
        mine_on_llama = ours(quantized, reference, text, args.n_ctx, args.chunks, args.threads, llama_base)
        for base_name, base, figures in (("quantmill (torch fp16 reference)", quantmill_base, mine),
                                         ("llama.cpp (F16 GGUF)", llama_base, mine_on_llama)):
            for gguf in (ggufs if base is quantmill_base else quantized):
                rows.append((base_name, gguf.name, figures[gguf], theirs(args.llama_perplexity, gguf, base, args.n_ctx,
                                                                         args.threads)))
        wall = time.perf_counter() - started

    print(f"{text.name}, {args.chunks} chunks × n_ctx {args.n_ctx}, threads {args.threads}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, total {wall:.0f} s\n")
    print("| base | GGUF | mean KLD quantmill | mean KLD llama.cpp | ratio | 99% KLD q / l | ratio "
          "| same top % q / l | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    worst = 0.0
    for base_name, name, q, ll in rows:
        ratios = [q[k] / ll[k] if ll[k] else float("nan") for k in ("kld_mean", "kld_p99", "top1_pct")]
        worst = max(worst, *(abs(r - 1) for r in ratios if r == r))
        print(f"| {base_name} | {name} | {q['kld_mean']:.6f} | {ll['kld_mean']:.6f} | {ratios[0]:.4f} "
              f"| {q['kld_p99']:.4f} / {ll['kld_p99']:.4f} | {ratios[1]:.4f} "
              f"| {q['top1_pct']:.3f} / {ll['top1_pct']:.3f} | {ratios[2]:.4f} |")
    print(f"\nlargest relative difference: {100 * worst:.3f} %")
    print(json.dumps({"largest_relative_difference": worst}))


if __name__ == "__main__":
    main()
