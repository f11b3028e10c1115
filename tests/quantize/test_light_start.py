"""`quantize gguf` starts light: libllama's binding alone, ggml's GGUF reader, no numpy, gguf-py or jinja2.

Its wall time against llama-quantize is a start-up budget of about a tenth of a second on a small
model (BENCHMARKS.md); these run in a fresh interpreter so that nothing this test process imported counts.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEAVY = ("numpy", "gguf", "jinja2", "torch", "transformers", "llama_cpp.llama")


def _fresh(code: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_quantize_path_imports_nothing_heavy(smollm2_gguf: Path) -> None:
    found = _fresh(f"""
import json, sys
from quantmill.cli import cli
from quantmill.quantize.gguf.inspect import summarize_gguf
from quantmill.quantize.gguf.libllama import _build_params, lookup_file_type
summary = summarize_gguf({str(smollm2_gguf)!r})
summary.require("gguf-quantize")
_build_params(lookup_file_type("Q4_K_M"), (), None, False)
print(json.dumps({{"heavy": sorted(m for m in {HEAVY!r} if m in sys.modules), "tensors": len(summary.tensors),
                   "package": "llama_cpp" in sys.modules}}))
""")
    assert found == {"heavy": [], "tensors": 272, "package": False}


def test_the_real_package_reuses_the_binding() -> None:
    """After the binding loaded alone, ``import llama_cpp`` is the whole package over the same declarations."""
    found = _fresh("""
import json
from quantmill.llama_lib import binding
first = binding()
import llama_cpp
import llama_cpp.llama_cpp as again
print(json.dumps({"same": again is first and llama_cpp.llama_model_quantize is first.llama_model_quantize,
                  "high_level": hasattr(llama_cpp, "Llama"), "version": llama_cpp.__version__}))
""")
    assert found == {"same": True, "high_level": True, "version": "0.3.36"}
