"""Perplexity: quantmill verify vs llama.cpp's llama-perplexity on the same GGUF, text, n_ctx and threads.

For each GGUF, quantmill's figure (llama-cpp-python, tokens from the reference tokenizer) and
llama-perplexity's (its own tokenizer, run as a subprocess) are printed side by side with
their ratio, and so are the evaluation speeds: tokens evaluated (chunks × n_ctx) per second
of evaluation, model loading excluded on both sides (llama-perplexity's time is read from
the timestamps of its "calculating perplexity" and "Final estimate" log lines). The fp16
reference checkpoint is also measured in torch, to compare it with its f16 GGUF.

Default artifacts: an f16 GGUF made from the reference by quantmill's converter, and the
bundled SmolLM2 Q4_1 GGUF. Build llama-perplexity from the llama-cpp-python sdist's
vendored llama.cpp (benchmark only; quantmill does not use it):

    bash scripts/llama_cpp_source.sh --build
    python benchmarks/bench_perplexity.py --threads 2                      # f16 + bundled Q4_1
    python benchmarks/bench_perplexity.py --gguf X-Q4_K_M.gguf --reference REF_DIR --repeat 2
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from quantmill.reference_tools import llama_cpp_tool

DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"

_FINAL_RE = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
_STAMP_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)\.(\d+) ", re.MULTILINE)


@dataclass
class Figure:
    ppl: float
    stderr: float
    eval_seconds: float
    n_tokens: int
    cpu_seconds: float  # user + system CPU time of the whole run, model loading included

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.eval_seconds


def _stamp_seconds(line: str) -> float:
    match = _STAMP_RE.match(line)
    if match is None:
        raise ValueError(f"no timestamp on llama-perplexity line: {line!r}")
    minutes, seconds, millis, micros = (int(g) for g in match.groups())
    return minutes * 60 + seconds + millis / 1e3 + micros / 1e6


def run_llama_perplexity(tool: Path, gguf: Path, text: Path, n_ctx: int, threads: int) -> Figure:
    cmd = [str(tool), "-m", str(gguf), "-f", str(text), "-c", str(n_ctx), "-t", str(threads), "-tb", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    log = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # reaps the child and gives its CPU time
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    final = _FINAL_RE.search(log)
    if proc.returncode != 0 or final is None:
        raise SystemExit(f"llama-perplexity failed ({proc.returncode}):\n{log[-2000:]}")
    lines = log.splitlines()
    start = next(line for line in lines if "calculating perplexity over" in line)
    end = next(line for line in lines if "Final estimate" in line)
    n_chunks = int(re.search(r"over (\d+) chunks", start).group(1))  # type: ignore[union-attr]
    seconds = _stamp_seconds(end) - _stamp_seconds(start)
    return Figure(float(final.group(1)), float(final.group(2)), seconds, n_chunks * n_ctx, cpu)


def run_quantmill(path: Path, plan: object, tokenizer: object, threads: int) -> Figure:
    from quantmill.verify.backends.base import BackendOptions
    from quantmill.verify.evaluate import evaluate_artifact

    before = resource.getrusage(resource.RUSAGE_SELF)
    result = evaluate_artifact(path, plan, tokenizer, BackendOptions(threads=threads))  # type: ignore[arg-type]
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return Figure(result.ppl, result.ppl_stderr, result.seconds, result.n_evaluated, cpu)


def best(figures: list[Figure]) -> Figure:
    return min(figures, key=lambda f: f.eval_seconds)


def default_ggufs(reference: Path, workdir: Path) -> list[Path]:
    from quantmill.convert.hf_to_gguf import convert_hf_to_gguf
    from quantmill.default_model import bundled_gguf_path

    (f16,) = convert_hf_to_gguf(reference, "f16", workdir / "SmolLM2-135M-Instruct-F16.gguf", progress=False)
    return [f16, bundled_gguf_path()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, action="append", help="GGUF file(s) [default: f16 of the reference + bundled Q4_1]")
    parser.add_argument("--reference", type=Path, help="fp16 reference checkpoint [default: quantmill's default model]")
    parser.add_argument("--text", type=Path, default=Path(DEFAULT_TEXT))
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool and file; the fastest counts")
    parser.add_argument("--llama-perplexity", type=Path, default=llama_cpp_tool("llama-perplexity"))
    parser.add_argument("--skip-torch", action="store_true", help="do not measure the reference in torch")
    args = parser.parse_args()
    if not args.llama_perplexity.is_file():
        raise SystemExit(f"{args.llama_perplexity}: not found; build llama-perplexity (see this script's docstring)")

    from quantmill.default_model import default_reference
    from quantmill.verify.tokens import load_reference_tokenizer, prepare_tokens

    reference = args.reference or default_reference()
    tokenizer = load_reference_tokenizer(reference)
    plan = prepare_tokens(args.text, tokenizer, args.n_ctx)
    with tempfile.TemporaryDirectory(prefix="bench_ppl_") as tmp:
        ggufs = args.gguf or default_ggufs(reference, Path(tmp))
        rows = []
        for gguf in ggufs:
            ours: list[Figure] = []
            theirs: list[Figure] = []
            for _ in range(args.repeat):  # alternate the tools so that machine load hits both alike
                ours.append(run_quantmill(gguf, plan, tokenizer, args.threads))
                theirs.append(run_llama_perplexity(args.llama_perplexity, gguf, args.text, args.n_ctx, args.threads))
            rows.append((gguf, best(ours), best(theirs)))
            print(f"done: {gguf.name}", file=sys.stderr)
        torch_ref = None if args.skip_torch else run_quantmill(reference, plan, tokenizer, args.threads)

    print(f"Text {args.text} ({plan.tokens.size} tokens, {plan.n_chunks} chunks of {args.n_ctx}), "
          f"threads {args.threads}, best of {args.repeat}, {time.strftime('%Y-%m-%d')}\n")
    print("| GGUF | quantmill ppl | llama-perplexity ppl | ppl ratio | quantmill tok/s | llama-perplexity tok/s "
          "| speed ratio | quantmill CPU s | llama-perplexity CPU s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for gguf, ours_best, theirs_best in rows:
        print(f"| {gguf.name} | {ours_best.ppl:.4f} ± {ours_best.stderr:.4f} | {theirs_best.ppl:.4f} ± {theirs_best.stderr:.4f} "
              f"| {ours_best.ppl / theirs_best.ppl:.6f} | {ours_best.tokens_per_second:.1f} "
              f"| {theirs_best.tokens_per_second:.1f} | {ours_best.tokens_per_second / theirs_best.tokens_per_second:.3f} "
              f"| {ours_best.cpu_seconds:.1f} | {theirs_best.cpu_seconds:.1f} |")
    if torch_ref is not None:
        print(f"\nReference {reference.name} in torch (fp32 compute): ppl {torch_ref.ppl:.4f} ± {torch_ref.stderr:.4f}, "
              f"{torch_ref.tokens_per_second:.1f} tok/s")
        for gguf, ours_best, _ in rows:
            print(f"- {gguf.name} (quantmill) vs torch reference: Δppl {100 * (ours_best.ppl / torch_ref.ppl - 1):+.4f} %")


if __name__ == "__main__":
    main()
