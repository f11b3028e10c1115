"""Importance matrix: quantmill's statistics pass vs llama.cpp's ``llama-imatrix``, same calibration text.

1. The calibration text: quantmill's seeded sample of the bundled corpora (``--samples`` sequences of
   ``--seqlen`` tokens, seed ``--seed``), decoded into one text file; both tools read that file and
   use its first ``n`` chunks of ``--seqlen`` tokens (n = what the re-tokenized file holds, at most
   ``--samples``), so they see the same tokens.
2. ``quantmill calibrate`` and ``llama-imatrix`` each write an importance matrix.
3. ``llama-quantize --imatrix`` makes Q4_K_M from the same F16 GGUF with each matrix (quantmill's
   file loading in llama-quantize is part of the check), plus ``quantmill quantize gguf --imatrix``
   with quantmill's matrix (libllama through llama-cpp-python: must be byte-identical to
   llama-quantize's output), plus Q4_K_M without any matrix.
4. ``quantmill verify`` measures them all on the bundled evaluation text (disjoint from the
   calibration corpora): perplexity, KL divergence, top-1 agreement.

    bash scripts/llama_cpp_source.sh --build
    .venv/bin/python benchmarks/bench_imatrix.py --threads 2
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from quantmill.reference_tools import llama_cpp_tool


def run(cmd: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return time.perf_counter() - started


def gguf_difference(a: Path, b: Path) -> str:
    """'' when tensor data and metadata agree; else which tensors / keys differ."""
    from gguf import GGUFReader

    ra, rb = GGUFReader(a), GGUFReader(b)
    ta, tb = {t.name: t for t in ra.tensors}, {t.name: t for t in rb.tensors}
    tensors = sorted(n for n in set(ta) | set(tb) if n not in ta or n not in tb
                     or ta[n].tensor_type != tb[n].tensor_type or ta[n].data.tobytes() != tb[n].data.tobytes())
    keys = sorted(k for k in set(ra.fields) | set(rb.fields)
                  if k not in ra.fields or k not in rb.fields or ra.fields[k].contents() != rb.fields[k].contents())
    parts = ([f"tensors {tensors}"] if tensors else ["tensor data byte-identical"]) + ([f"metadata keys {keys}"] if keys else [])
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-chunks", type=int, default=32)
    parser.add_argument("--type", default="Q4_K_M")
    parser.add_argument("--work", type=Path, help="keep the files here [default: a temporary directory]")
    args = parser.parse_args()

    from tokenizers import Tokenizer

    from quantmill.calib_data.bundled import eval_file
    from quantmill.calib_data.loaders import load_calibration_text
    from quantmill.calib_data.sampling import load_tokenize, sample_sequences
    from quantmill.convert.hf_to_gguf import convert_hf_to_gguf
    from quantmill.default_model import default_reference

    reference = default_reference()
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="bench_imatrix_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        sampled = sample_sequences(load_calibration_text("bundled"), load_tokenize(reference), args.samples + 1,
                                   args.seqlen, args.seed)
        tokenizer = Tokenizer.from_file(str(reference / "tokenizer.json"))
        calib_txt = work / "calibration.txt"
        calib_txt.write_text("\n".join(tokenizer.decode(list(map(int, row))) for row in sampled.token_ids), encoding="utf-8")
        n_tokens = len(tokenizer.encode(calib_txt.read_text(encoding="utf-8"), add_special_tokens=False).ids)
        chunks = min(args.samples, n_tokens // args.seqlen)

        f16 = work / "SmolLM2-135M-Instruct-F16.gguf"
        if not f16.exists():
            convert_hf_to_gguf(reference, "f16", outfile=f16, progress=False)
        ours_imatrix, theirs_imatrix = work / "imatrix-quantmill.gguf", work / "imatrix-llama.gguf"
        t_ours = run([py, "-m", "quantmill.cli", "calibrate", str(reference), "--calib", str(calib_txt),
                      "--calib-samples", str(chunks), "--calib-seqlen", str(args.seqlen), "--seed", str(args.seed),
                      "--out", str(ours_imatrix), "--threads", str(args.threads), "--no-progress"])
        t_theirs = run([str(llama_cpp_tool("llama-imatrix")), "-m", str(f16), "-f", str(calib_txt), "-c", str(args.seqlen),
                        "--chunks", str(chunks), "-t", str(args.threads), "-o", str(theirs_imatrix)])

        quant = llama_cpp_tool("llama-quantize")
        outputs = {
            f"{args.type}, no imatrix": work / f"{args.type}-plain.gguf",
            f"{args.type}, quantmill imatrix (llama-quantize)": work / f"{args.type}-quantmill-imatrix.gguf",
            f"{args.type}, llama-imatrix (llama-quantize)": work / f"{args.type}-llama-imatrix.gguf",
        }
        names = list(outputs)
        run([str(quant), str(f16), str(outputs[names[0]]), args.type, str(args.threads)])
        run([str(quant), "--imatrix", str(ours_imatrix), str(f16), str(outputs[names[1]]), args.type, str(args.threads)])
        run([str(quant), "--imatrix", str(theirs_imatrix), str(f16), str(outputs[names[2]]), args.type, str(args.threads)])
        via_quantmill = work / f"{args.type}-quantmill-imatrix-libllama.gguf"
        run([py, "-m", "quantmill.cli", "quantize", "gguf", str(f16), "--type", args.type, "--imatrix", str(ours_imatrix),
             "--out", str(via_quantmill), "--threads", str(args.threads)])

        from quantmill.verify.backends.base import BackendOptions
        from quantmill.verify.evaluate import verify_artifacts

        result = verify_artifacts(list(outputs.values()), reference, eval_file(), 512, BackendOptions(threads=args.threads),
                                  max_chunks=args.eval_chunks)
        by_path = {r.path: r for r in result.artifacts}
        print(f"calibration: {chunks} × {args.seqlen} tokens of quantmill's seeded sample (seed {args.seed}) of the bundled "
              f"corpora, one text file for both tools; evaluation: {result.n_chunks} × 512 tokens of "
              f"{eval_file().name}; threads {args.threads}; {time.strftime('%Y-%m-%d %H:%M')}\n")
        print(f"imatrix wall time: quantmill calibrate {t_ours:.1f} s, llama-imatrix {t_theirs:.1f} s "
              f"(ratio {t_ours / t_theirs:.2f}; each includes its own model loading)\n")
        print("| artifact | bpw | ppl ± stderr | Δppl % | mean KLD | same top % |")
        print("|---|---:|---:|---:|---:|---:|")
        ref = result.reference
        print(f"| fp16 reference (torch) | {ref.bpw:.3f} | {ref.ppl:.4f} ± {ref.ppl_stderr:.4f} | 0 | — | — |")
        for name, path in outputs.items():
            r = by_path[path]
            print(f"| {name} | {r.bpw:.3f} | {r.ppl:.4f} ± {r.ppl_stderr:.4f} | {result.delta_ppl_pct(r):+.2f} "
                  f"| {r.metrics['kld_mean']:.5f} | {100 * r.metrics['top1_agreement']:.2f} |")
        print(f"\nquantmill quantize gguf --imatrix (libllama via llama-cpp-python) vs llama-quantize with the same "
              f"imatrix: {gguf_difference(via_quantmill, outputs[names[1]])}")
        ours_ppl, theirs_ppl = by_path[outputs[names[1]]].ppl, by_path[outputs[names[2]]].ppl
        print(f"quantmill imatrix ppl / llama-imatrix ppl = {ours_ppl / theirs_ppl:.4f} "
              f"({'no worse' if ours_ppl <= theirs_ppl else 'WORSE'})")


if __name__ == "__main__":
    main()
