#!/usr/bin/env bash
# The prepared device check (issue 17), for a lent NVIDIA GPU machine; about 8 minutes of GPU time. Here first:
#     bash benchmarks/gpu_wheels.sh          # .gpu/: wheels + SmolLM2's tokenizer (must stay under 64 MiB)
# then through the device tool, in one call:
#     run(command="bash benchmarks/gpu_check.sh", carry=[".gpu"], timeout_s=560)
# Writes to $OUT: nvidia-smi.txt, pytest-gpu.txt (the `gpu` tests), gptq-*.jsonl (an 8B-shaped random llama, 4-bit g128
# act-order, by quantmill and by GPTQModel on the same GPU and the same tokens, then verify of both on the GPU),
# verify-parity.json / .md (the replica and its GPTQ branch measured on cpu and cuda), and check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/check.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 QUANTMILL_CACHE=/tmp/qm-cache
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
# wheels built here under Python 3.11 (llama-cpp-python loads libllama by ctypes; GPTQModel without its kernels is Python)
# are unpacked, as pip refuses their cp311 tag under 3.12; the others are installed
mkdir -p /tmp/site
for w in .gpu/whl/*cp311*.whl; do [ -f "$w" ] && python3 -m zipfile -e "$w" /tmp/site; done
ls .gpu/whl/*.whl | grep -v cp311 | xargs python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/site || exit 2
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site .gpu/sdist/*.tar.gz \
    || echo "pypcre did not build here: the GPTQModel side will report its import error"
export PYTHONPATH=/tmp/site:$PWD/tests
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/qm . || exit 2
export PYTHONPATH=/tmp/qm:$PYTHONPATH
# libggml-cuda links libcublas.so.13 by its soname: torch's nvidia-cublas provides it
export LD_LIBRARY_PATH=$(python3 -c "import nvidia.cu13, os; print(os.path.join(nvidia.cu13.__path__[0], 'lib'))"):${LD_LIBRARY_PATH:-}
python3 -c "import torch, llama_cpp; print('torch', torch.__version__, torch.cuda.get_device_name(0), 'llama.cpp GPU offload',
            bool(llama_cpp.llama_supports_gpu_offload()))"
echo "== gpu tests"; date
timeout 90 python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/pytest-gpu.txt"
echo "== GPTQ: 8B-shaped llama (${LAYERS:=4} layers), quantmill vs GPTQModel on cuda"; date
GPTQ_PY=$(command -v python3)
timeout 240 python3 benchmarks/bench_gptq.py compare --model llama-8b-replica --layers "$LAYERS" --bits 4 --group 128 \
    --device cuda --threads 16 --samples 128 --seqlen 512 --max-chunks 8 --work /tmp/gptq-work \
    --tokenizer .gpu/smollm2_tokenizer --gptqmodel-python "$GPTQ_PY" 2>&1 | tee "$OUT/gptq-8b-replica.jsonl"
echo "== verify parity: the replica and quantmill's branch, cpu vs cuda"; date
branch=$(ls -d /tmp/gptq-work/quantmill-*/gptq-* 2>/dev/null | head -1)
timeout 90 python3 -m quantmill.cli verify /tmp/gptq-work/llama-8b-replica ${branch:+"$branch"} \
    --reference /tmp/gptq-work/llama-8b-replica --text calib_data/corpora/eval_text.txt --max-chunks 4 \
    --devices cpu,cuda --threads 16 --report-dir "$OUT/verify-parity"
python3 - "$OUT" "$LAYERS" <<'PY'  # per-layer GPTQ seconds of both tools, and their ratio, from the bench's JSON lines
import json, pathlib, sys
out, layers = pathlib.Path(sys.argv[1]), int(sys.argv[2])
rows = [json.loads(l) for l in (out / "gptq-8b-replica.jsonl").read_text().splitlines() if l.startswith("{")]
wall = {r["tool"]: r["wall_s"] for r in rows if "wall_s" in r}
summary = {"layers": layers, **{f"{tool}_s_per_layer": round(s / layers, 2) for tool, s in wall.items()}}
if len(wall) == 2:
    summary["quantmill_over_gptqmodel"] = round(wall["quantmill"] / wall["gptqmodel-7.6.0"], 3)
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(summary)
PY
echo "== done"; date
