"""HF → GGUF conversion: quantmill vs llama.cpp's convert_hf_to_gguf.py, wall time and peak RSS.

Both converters run as subprocesses on the same checkpoint, with a warm page cache;
peak RSS is the child's ``ru_maxrss`` (from ``os.wait4``), which counts memory-mapped
file pages too. llama.cpp's script runs with its own gguf-py
(``PYTHONPATH=<llama.cpp>/gguf-py``), as it must. The outputs of the two are compared
byte for byte.

Checkpoints: the default model's fp16 reference (SmolLM2-135M-Instruct) and a random
~1.2B-parameter llama (TinyLlama-like shape, SmolLM2's 49,152-token vocabulary, fp16),
written one decoder layer per safetensors shard so generating it stays small too.

    python benchmarks/bench_convert.py                    # SmolLM2 + 1B, f16, bf16 and q8_0
    python benchmarks/bench_convert.py --skip-1b --repeat 3
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RSS_LIMIT_MB = 1024.0
# TinyLlama-1.1B's shape with SmolLM2's vocabulary: 1.17e9 parameters.
RANDOM_1B = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 49152,
}


@dataclass
class Run:
    seconds: float
    cpu_seconds: float  # user + system: what the converter itself used, whatever else the machine runs
    peak_rss_mb: float
    sha256: str


def run_measured(cmd: list[str], out: Path, env: dict[str, str] | None = None) -> Run:
    """Run ``cmd`` to completion; wall time, the child's peak RSS and the output's sha256."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{stderr.decode(errors='replace')[-3000:]}")
    digest = hashlib.sha256()
    with open(out, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return Run(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, digest.hexdigest())


def quantmill_cmd(model: Path, outtype: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "quantmill.cli", "convert", "hf-to-gguf", str(model), "--outtype", outtype, "--outfile", str(out)]


def llama_cpp_cmd(llama_cpp: Path, model: Path, outtype: str, out: Path) -> list[str]:
    return [sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(model), "--outtype", outtype, "--outfile", str(out)]


def best_of(repeat: int, cmd: list[str], out: Path, env: dict[str, str] | None = None) -> Run:
    runs = [run_measured(cmd, out, env) for _ in range(repeat)]
    return min(runs, key=lambda r: r.seconds)


def warm(model: Path) -> None:
    for path in sorted(model.glob("*.safetensors")):
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def write_random_llama(out: Path, tokenizer_dir: Path | None, seed: int = 0, shape: dict[str, int] = RANDOM_1B,
                       tie_word_embeddings: bool = False) -> Path:
    """A random fp16 llama checkpoint of ``shape``, one safetensors shard per decoder layer (plus one for the rest)."""
    from safetensors.numpy import save_file

    if (out / "model.safetensors.index.json").is_file():
        return out
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    c = shape
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head_dim
    h, ff, n = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    shards: list[dict[str, np.ndarray]] = []
    for i in range(n):
        p = f"model.layers.{i}."
        shards.append({
            p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(ff, h), p + "mlp.up_proj.weight": rand(ff, h),
            p + "mlp.down_proj.weight": rand(h, ff),
            p + "input_layernorm.weight": np.ones(h, np.float16), p + "post_attention_layernorm.weight": np.ones(h, np.float16),
        })
    weight_map: dict[str, str] = {}
    total = n + 1
    for i in range(total):
        tensors = shards[i] if i < n else {
            "model.embed_tokens.weight": rand(c["vocab_size"], h),
            "model.norm.weight": np.ones(h, np.float16),
            **({} if tie_word_embeddings else {"lm_head.weight": rand(c["vocab_size"], h)}),
        }
        name = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        del tensors
        if i < n:
            shards[i] = {}
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float16",
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": 1, "eos_token_id": 2, **c,
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json") if tokenizer_dir is not None else ():
        shutil.copy(tokenizer_dir / name, tmp / name)
    os.replace(tmp, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/quantmill-bench"))
    parser.add_argument("--llama-cpp", type=Path, default=None)
    parser.add_argument("--outtypes", default="f16,bf16,q8_0")
    parser.add_argument("--repeat", type=int, default=1, help="runs per converter; the fastest is reported")
    parser.add_argument("--skip-1b", action="store_true", help="only the SmolLM2 reference")
    parser.add_argument("--1b-llama-cpp", dest="big_llama_cpp", action="store_true", help="also run llama.cpp on the 1B model")
    args = parser.parse_args()

    from quantmill.default_model import default_reference
    from quantmill.reference_tools import llama_cpp_source_dir

    args.llama_cpp = args.llama_cpp or llama_cpp_source_dir()
    script = args.llama_cpp / "convert_hf_to_gguf.py"
    if not script.is_file():
        sys.exit(f"{script}: not found; pass --llama-cpp or set QUANTMILL_LLAMA_CPP_DIR")
    env = {**os.environ, "PYTHONPATH": str(args.llama_cpp / "gguf-py")}
    args.work.mkdir(parents=True, exist_ok=True)
    reference = default_reference()
    models = [("SmolLM2-135M fp16", reference, True)]
    if not args.skip_1b:
        big = args.work / "random-1b"
        if not (big / "model.safetensors.index.json").is_file():
            write_random_llama(big, reference)
            # A child's ru_maxrss starts from its parent's resident size at fork, and building the
            # checkpoint left this process large: start again small before measuring anything.
            os.execv(sys.executable, [sys.executable, *sys.argv])
        models.append(("random llama 1.17B fp16", big, args.big_llama_cpp))

    rows = ["| checkpoint | outtype | llama.cpp s | quantmill s | time ratio | CPU s ratio | llama.cpp peak RSS MB"
            " | quantmill peak RSS MB | RSS ratio | identical bytes |", "|---|---|---|---|---|---|---|---|---|---|"]
    checks: list[str] = []
    for label, model, with_llama_cpp in models:
        warm(model)
        for outtype in args.outtypes.split(","):
            ours_out, ref_out = args.work / f"quantmill-{outtype}.gguf", args.work / f"llama-cpp-{outtype}.gguf"
            ours = best_of(args.repeat, quantmill_cmd(model, outtype, ours_out), ours_out)
            if with_llama_cpp:
                ref = best_of(args.repeat, llama_cpp_cmd(args.llama_cpp, model, outtype, ref_out), ref_out, env)
                rows.append(
                    f"| {label} | {outtype} | {ref.seconds:.1f} | {ours.seconds:.1f} | {ours.seconds / ref.seconds:.2f} |"
                    f" {ours.cpu_seconds / ref.cpu_seconds:.2f} |"
                    f" {ref.peak_rss_mb:.0f} | {ours.peak_rss_mb:.0f} | {ours.peak_rss_mb / ref.peak_rss_mb:.2f} |"
                    f" {'yes' if ref.sha256 == ours.sha256 else 'NO'} |"
                )
            else:
                rows.append(f"| {label} | {outtype} | – | {ours.seconds:.1f} | – | – | – | {ours.peak_rss_mb:.0f} | – | – |")
            if "1.17B" in label:
                verdict = "PASS" if ours.peak_rss_mb < RSS_LIMIT_MB else "FAIL"
                checks.append(f"- {label}, {outtype}: quantmill peak RSS {ours.peak_rss_mb:.0f} MB (< {RSS_LIMIT_MB:.0f} MB: {verdict})")
            for path in (ours_out, ref_out):
                path.unlink(missing_ok=True)
    print("\n".join(rows))
    if checks:
        print()
        print("\n".join(checks))


if __name__ == "__main__":
    main()
