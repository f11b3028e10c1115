"""The layer-by-layer statistics pass, the imatrix file and its hand-off to libllama."""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from quantmill.calib_data.loaders import CalibrationText
from quantmill.calib_data.sampling import CalibrationSet, load_tokenize, sample_sequences
from quantmill.cli import main
from quantmill.convert.arch.llama import LlamaArchitecture
from quantmill.errors import InputFileError, UnsupportedError
from quantmill.quantize.gguf.imatrix import (
    Imatrix,
    ImatrixEntry,
    gguf_weight_name,
    imatrix_from_stats,
    read_imatrix,
    write_imatrix,
)
from quantmill.quantize.layerwise import LayerwiseRunner
from quantmill.quantize.stats import Hessian, SumSquares, attach_collectors, collect_importance, iter_layer_stats

TEXT = (Path(__file__).resolve().parents[2] / "calib_data" / "corpora" / "calib_as_you_like_it.txt").read_text(encoding="utf-8")
LLAMA_LINEARS = ("k_proj", "q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture
def tiny_fp16(make_tiny_llama) -> Path:
    return make_tiny_llama("bpe", name="tiny16", dtype="float16", num_hidden_layers=3)


@pytest.fixture
def calib(tiny_fp16: Path) -> CalibrationSet:
    return sample_sequences(CalibrationText("ayli", (TEXT,)), load_tokenize(tiny_fp16), samples=6, seqlen=48, seed=3)


def _reference_stats(model_dir: Path, ids: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Σx² and XᵀX per linear from the whole transformers model (fp32), by forward hooks."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    stats: dict[str, list[torch.Tensor]] = {}

    def hook(name: str):
        def fn(_m, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            s = stats.setdefault(name, [torch.zeros(x.shape[1], dtype=torch.float64), torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)])
            s[0] += (x * x).sum(0)
            s[1] += x.t() @ x

        return fn

    for name, module in model.named_modules():
        if name.startswith("model.layers.") and isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(hook(name))
    with torch.inference_mode():
        model(torch.from_numpy(ids.astype(np.int64)))
    return {k: (v[0].numpy(), v[1].numpy()) for k, v in stats.items()}


def test_layerwise_stats_match_the_whole_model(tiny_fp16: Path, calib: CalibrationSet) -> None:
    reference = _reference_stats(tiny_fp16, calib.token_ids)
    got: dict[str, dict] = {}
    for layer in iter_layer_stats(tiny_fp16, calib, ("hessian", "sum_squares"), progress=False):
        got.update(layer.collectors)
    assert sorted(got) == sorted(reference)
    assert len(got) == 3 * len(LLAMA_LINEARS)
    # linears that read the same input share one set of collectors (fed once)
    assert got["model.layers.0.self_attn.q_proj"] is got["model.layers.0.self_attn.v_proj"]
    assert got["model.layers.0.mlp.gate_proj"] is got["model.layers.0.mlp.up_proj"]
    assert got["model.layers.0.mlp.up_proj"] is not got["model.layers.0.mlp.down_proj"]
    tokens = calib.samples * calib.seqlen
    for name, (ref_sq, ref_xtx) in reference.items():
        sq, hess = got[name]["sum_squares"], got[name]["hessian"]
        assert isinstance(sq, SumSquares) and isinstance(hess, Hessian)
        assert sq.count == hess.count == tokens
        np.testing.assert_allclose(sq.values(), ref_sq, rtol=2e-4, err_msg=name)
        np.testing.assert_allclose(hess.diagonal(), ref_sq, rtol=2e-4, err_msg=name)
        np.testing.assert_allclose(hess.xtx.numpy(), ref_xtx, rtol=2e-3, atol=2e-3 * np.abs(ref_xtx).max(), err_msg=name)


def test_runner_serves_gptq_style_steps(tiny_fp16: Path, calib: CalibrationSet) -> None:
    """Collect one group, change its weights, then advance: the next layer sees the changed outputs."""
    import torch

    def run(zero_layer0_v: bool) -> np.ndarray:
        runner = LayerwiseRunner(tiny_fp16, calib.token_ids, progress=False)
        last = None
        for step in runner.layers():
            collectors, observers = attach_collectors(step, ["hessian"], ["self_attn.q_proj"])
            step.run(observers, update=False)
            assert list(collectors) == [f"model.layers.{step.index}.self_attn.q_proj"]
            if zero_layer0_v and step.index == 0:
                with torch.no_grad():
                    step.linears()["self_attn.v_proj"].weight.zero_()
            step.run({}, update=True)
            last = collectors
        assert last is not None
        return last["model.layers.2.self_attn.q_proj"]["hessian"].xtx.numpy().copy()

    plain, changed = run(False), run(True)
    assert not np.allclose(plain, changed)


def test_runner_refuses_a_layer_left_unadvanced(tiny_fp16: Path, calib: CalibrationSet) -> None:
    runner = LayerwiseRunner(tiny_fp16, calib.token_ids, progress=False)
    layers = runner.layers()
    next(layers)
    with pytest.raises(RuntimeError, match="not advanced"):
        next(layers)


def test_sharded_checkpoint_gives_the_same_stats(make_tiny_llama, calib: CalibrationSet, tiny_fp16: Path) -> None:
    sharded = make_tiny_llama("bpe", name="sharded", dtype="float16", num_hidden_layers=3, max_shard_size="2MB")
    assert (sharded / "model.safetensors.index.json").is_file()
    a = collect_importance(tiny_fp16, calib, progress=False)
    b = collect_importance(sharded, calib, progress=False)
    for name in a.sum_squares:
        np.testing.assert_array_equal(a.sum_squares[name], b.sum_squares[name])


def test_gguf_names_follow_gguf_py() -> None:
    decoder = LlamaArchitecture.decoder
    names = [gguf_weight_name(LlamaArchitecture().gguf_arch, decoder.hf_linear_name(7, n), 8) for n in decoder.linear_names]
    assert names == [
        "blk.7.attn_k.weight", "blk.7.attn_q.weight", "blk.7.attn_v.weight", "blk.7.attn_output.weight",
        "blk.7.ffn_gate.weight", "blk.7.ffn_up.weight", "blk.7.ffn_down.weight",
    ]


def test_imatrix_file_round_trip(tiny_fp16: Path, calib: CalibrationSet, tmp_path: Path) -> None:
    stats = collect_importance(tiny_fp16, calib, progress=False)
    imatrix = imatrix_from_stats(stats, calib)
    path = write_imatrix(imatrix, tmp_path / "imatrix.gguf")
    back = read_imatrix(path)
    assert back.datasets == ("ayli",)
    assert (back.chunk_count, back.chunk_size) == (6, 48)
    assert back.calibration["token_sha256"] == calib.sha256
    assert back.calibration["seed"] == 3
    assert sorted(back.entries) == sorted(imatrix.entries)
    assert len(back.entries) == 3 * len(LLAMA_LINEARS)
    entry = back.entries["blk.1.ffn_down.weight"]
    assert entry.sums.shape == (1, 128) and entry.counts.tolist() == [6 * 48]
    np.testing.assert_array_equal(entry.sums, imatrix.entries["blk.1.ffn_down.weight"].sums)
    expected = stats.sum_squares["model.layers.1.mlp.down_proj"] / (6 * 48)
    np.testing.assert_allclose(back.means()["blk.1.ffn_down.weight"], expected, rtol=1e-6)
    import gguf

    reader = gguf.GGUFReader(str(path))
    assert "general.architecture" not in reader.fields
    assert reader.fields["general.type"].contents() == "imatrix"
    names = [t.name for t in reader.tensors]
    assert names == [f"{n}{suffix}" for n in sorted(imatrix.entries) for suffix in (".in_sum2", ".counts")]


def test_means_of_an_unseen_matrix_are_one() -> None:
    entry = ImatrixEntry(sums=np.array([[4.0, 8.0], [1.0, 1.0]], dtype=np.float32), counts=np.array([2, 0]))
    assert entry.means().tolist() == [2.0, 4.0, 1.0, 1.0]


def _cli(*args: str) -> int:
    return main([*args])


def test_calibrate_cli_same_seed_same_bytes(tiny_fp16: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "calib.txt"
    text.write_text(TEXT, encoding="utf-8")
    common = ["calibrate", str(tiny_fp16), "--calib", str(text), "--calib-samples", "4", "--calib-seqlen", "32", "--no-progress"]
    out = tmp_path / "out"
    assert _cli(*common, "--seed", "1", "--out", str(out / "a.gguf")) == 0
    first = capsys.readouterr().out
    assert _cli(*common, "--seed", "1", "--out", str(out / "b.gguf")) == 0
    assert capsys.readouterr().out.splitlines()[-1] == first.splitlines()[-1]  # same token sha256
    assert _cli(*common, "--seed", "2", "--out", str(out / "c.gguf")) == 0
    a, b, c = ((out / n).read_bytes() for n in ("a.gguf", "b.gguf", "c.gguf"))
    assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest()
    assert a != c
    assert read_imatrix(out / "a.gguf").calibration["token_sha256"] in first
    assert sorted(p.name for p in out.iterdir()) == ["a.gguf", "b.gguf", "c.gguf"]  # no temporary left


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        ("short", "enough for"),
        ("empty", "is empty"),
        ("binary", "binary"),
        ("missing", "no such file"),
        ("suffix", "unsupported calibration file type"),
    ],
)
def test_calibrate_cli_bad_input(
    setup: str, needle: str, tiny_fp16: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    calib = tmp_path / ("calib.csv" if setup == "suffix" else "calib.txt")
    content = {"short": b"Only a few words of text.", "empty": b"  \n\n", "binary": b"\x7fELF\x00\x01\x02" * 50, "suffix": b"a,b"}
    if setup in content:
        calib.write_bytes(content[setup])
    out = tmp_path / "out" / "imatrix.gguf"
    code = _cli("calibrate", str(tiny_fp16), "--calib", str(calib), "--calib-samples", "4", "--calib-seqlen", "64", "--out", str(out))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and needle in err and str(calib) in err
    assert not out.exists()
    assert not any(p.name.endswith(".part") for p in out.parent.iterdir()) if out.parent.exists() else True


def test_calibrate_cli_refuses_a_family_without_the_statistics_pass(make_tiny_llama, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A family whose record lacks the capability is refused by name before any work (here: an unknown one)."""
    import json

    model = make_tiny_llama("bpe", name="gpt2ish")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    out = tmp_path / "im.gguf"
    capsys.readouterr()
    assert _cli("calibrate", str(model), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "GPT2LMHeadModel is not supported" in err and "config.json" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    with pytest.raises(UnsupportedError):
        LayerwiseRunner(model, np.zeros((1, 4), dtype=np.int32))


def test_imatrix_param_array_is_null_terminated_means() -> None:
    pytest.importorskip("llama_cpp")
    from quantmill.quantize.gguf.imatrix_data import imatrix_kv_overrides, imatrix_param_array, kv_override_array

    imatrix = Imatrix(
        entries={
            "blk.0.ffn_up.weight": ImatrixEntry(np.array([[2.0, 4.0, 6.0]], dtype=np.float32), np.array([2])),
            "blk.0.attn_q.weight": ImatrixEntry(np.array([[9.0, 3.0]], dtype=np.float32), np.array([3])),
        },
        datasets=("bundled",),
        chunk_count=2,
        chunk_size=512,
    )
    pointer, keepalive = imatrix_param_array(imatrix)
    assert keepalive
    assert pointer[0].name == b"blk.0.attn_q.weight" and pointer[0].size == 2
    assert [pointer[0].data[i] for i in range(2)] == [3.0, 1.0]
    assert pointer[1].name == b"blk.0.ffn_up.weight" and [pointer[1].data[i] for i in range(3)] == [1.0, 2.0, 3.0]
    assert pointer[2].name is None and pointer[2].size == 0
    items = imatrix_kv_overrides(imatrix, "imatrix.gguf")
    assert items == [
        ("quantize.imatrix.file", "imatrix.gguf"),
        ("quantize.imatrix.dataset", "bundled"),
        ("quantize.imatrix.entries_count", 2),
        ("quantize.imatrix.chunks_count", 2),
    ]
    from quantmill.quantize.gguf.imatrix_data import check_imatrix_fits

    check_imatrix_fits(imatrix.means(), {"blk.0.attn_q.weight": 2, "blk.0.ffn_up.weight": 3, "output.weight": 2}, "im.gguf", "m.gguf")
    with pytest.raises(InputFileError, match=r"im\.gguf: entry blk\.0\.ffn_up\.weight has 3 values but .* have 4"):
        check_imatrix_fits(imatrix.means(), {"blk.0.ffn_up.weight": 4}, "im.gguf", "m.gguf")
    with pytest.raises(InputFileError, match="has no entry for any weight of m.gguf"):
        check_imatrix_fits(imatrix.means(), {"blk.9.ffn_up.weight": 3}, "im.gguf", "m.gguf")
    kv, _keep = kv_override_array(items)
    assert kv[2].key == b"quantize.imatrix.entries_count" and kv[2].value.val_i64 == 2
    assert kv[1].value.val_str == b"bundled"
    assert kv[4].key == b""


@pytest.fixture(scope="module")
def smollm2_f16(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(fp16 reference checkpoint, its F16 GGUF written by quantmill's converter)."""
    from quantmill.default_model import default_reference

    reference = default_reference()
    f16 = tmp_path_factory.mktemp("smollm2") / "smollm2-f16.gguf"
    assert main(["convert", "hf-to-gguf", str(reference), "--outtype", "f16", "--outfile", str(f16)]) == 0
    return reference, f16


@pytest.mark.slow
def test_smollm2_imatrix_enables_iq2_xs_in_libllama(tmp_path: Path, smollm2_f16: tuple[Path, Path]) -> None:
    """End to end on the real model: calibrate the fp16 reference, then libllama accepts the
    imatrix for IQ2_XS (a type it refuses without one) and records the quantize.imatrix keys."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import gguf

    from quantmill.quantize.gguf.imatrix_data import imatrix_kv_overrides, imatrix_param_array, kv_override_array

    reference, f16 = smollm2_f16
    out = tmp_path / "imatrix.gguf"
    assert main(["calibrate", str(reference), "--calib", "bundled", "--calib-samples", "4", "--calib-seqlen", "128",
                 "--seed", "0", "--out", str(out), "--no-progress"]) == 0
    imatrix = read_imatrix(out)
    assert len(imatrix.entries) == 30 * 7
    assert imatrix.entries["blk.0.attn_q.weight"].sums.shape == (1, 576)
    assert imatrix.entries["blk.29.ffn_down.weight"].sums.shape == (1, 1536)

    def quantize(with_imatrix: bool) -> int:
        # Q8_0 everywhere (fast) except one ffn_down as IQ2_XS, a type libllama refuses without an imatrix
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
        params.nthread = 2
        overrides = (llama_cpp.llama_model_tensor_override * 2)()
        overrides[0].pattern, overrides[0].type = rb"blk\.7\.ffn_down", int(gguf.GGMLQuantizationType.IQ2_XS)
        overrides[1].pattern = None
        params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
        keep: list[object] = [overrides]
        if with_imatrix:
            params.imatrix, imatrix_keep = imatrix_param_array(out)
            kv, kv_keep = kv_override_array(imatrix_kv_overrides(out, "imatrix.gguf"))
            params.kv_overrides = kv
            keep += imatrix_keep + kv_keep
        target = tmp_path / f"iq2_xs_{with_imatrix}.gguf"
        return llama_cpp.llama_model_quantize(os.fsencode(f16), os.fsencode(target), ctypes.byref(params))

    assert quantize(False) != 0  # refused: IQ2_XS needs an importance matrix
    assert quantize(True) == 0
    reader = gguf.GGUFReader(str(tmp_path / "iq2_xs_True.gguf"))
    assert reader.fields["quantize.imatrix.entries_count"].contents() == 210
    assert reader.fields["quantize.imatrix.dataset"].contents() == "bundled"
    assert reader.fields["quantize.imatrix.chunks_count"].contents() == 4
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.7.ffn_down.weight"] == "IQ2_XS"
    assert types["blk.6.ffn_down.weight"] == types["blk.0.attn_q.weight"] == "Q8_0"


def _llama_tool(name: str) -> Path | None:
    from quantmill.reference_tools import llama_cpp_tool

    candidate = llama_cpp_tool(name)
    return candidate if candidate.is_file() else None


@pytest.mark.slow
def test_imatrix_loads_in_llama_quantize(tmp_path: Path, smollm2_f16: tuple[Path, Path]) -> None:
    """llama.cpp's own loader reads quantmill's file (skipped where the tool is not built)."""
    binary = _llama_tool("llama-quantize")
    if binary is None:
        pytest.skip("llama-quantize is not built: run `bash scripts/llama_cpp_source.sh --build` (scripts/test.sh does)")
    reference, f16 = smollm2_f16
    imatrix_path = tmp_path / "imatrix.gguf"
    assert main(["calibrate", str(reference), "--calib-samples", "2", "--calib-seqlen", "64",
                 "--out", str(imatrix_path), "--no-progress", "--device", "cpu"]) == 0
    result = subprocess.run(
        [str(binary), "--imatrix", str(imatrix_path), str(f16), str(tmp_path / "q.gguf"), "Q4_K_M", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "loaded 210 importance matrix entries" in result.stdout + result.stderr
    assert "imatrix datasets=['bundled']" in result.stdout + result.stderr


@pytest.mark.slow
def test_matches_llama_imatrix_on_the_same_tokens(tmp_path: Path, smollm2_f16: tuple[Path, Path]) -> None:
    """On the same 4 x 128 tokens, quantmill's file has llama-imatrix's names, shapes, counts and
    (to fp16-vs-fp32 rounding) values. Skipped where llama.cpp's tools are not built."""
    tool = _llama_tool("llama-imatrix")
    if tool is None:
        pytest.skip("llama-imatrix is not built: run `bash scripts/llama_cpp_source.sh --build` (scripts/test.sh does)")
    reference, f16 = smollm2_f16
    tokenize = load_tokenize(reference)
    eval_text = (Path(__file__).resolve().parents[2] / "calib_data" / "corpora" / "eval_text.txt").read_text(encoding="utf-8")
    cut = next(n for n in range(1000, len(eval_text), 50) if len(tokenize(eval_text[:n])) >= 4 * 128 + 32)
    text = tmp_path / "chunks.txt"
    text.write_text(eval_text[:cut], encoding="utf-8")  # exactly 4 whole windows of 128 tokens
    theirs = tmp_path / "llama.imatrix.gguf"
    subprocess.run([str(tool), "-m", str(f16), "-f", str(text), "-c", "128", "-t", "2", "-o", str(theirs)],
                   check=True, capture_output=True, timeout=600)
    ours = tmp_path / "quantmill.imatrix.gguf"
    assert main(["calibrate", str(reference), "--calib", str(text), "--calib-samples", "4", "--calib-seqlen", "128",
                 "--out", str(ours), "--no-progress"]) == 0
    a, b = read_imatrix(theirs), read_imatrix(ours)
    assert (a.datasets, a.chunk_count, a.chunk_size) == (b.datasets, b.chunk_count, b.chunk_size)
    assert sorted(a.entries) == sorted(b.entries) and len(a.entries) == 210
    for name, theirs_entry in a.entries.items():
        ours_entry = b.entries[name]
        assert ours_entry.counts.tolist() == theirs_entry.counts.tolist() == [512]
        np.testing.assert_allclose(ours_entry.sums, theirs_entry.sums, rtol=5e-3, atol=5e-3 * theirs_entry.sums.max(), err_msg=name)
