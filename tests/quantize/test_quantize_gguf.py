"""``quantmill quantize gguf``: real libllama quantization of tiny GGUF files, checked by reading them back."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from tiny_gguf import TinyShape, bpe_vocab, write_tiny_gguf

from quantmill.cli import main
from quantmill.errors import UserInputError
from quantmill.quantize.gguf.inspect import summarize_gguf
from quantmill.quantize.gguf.libllama import (
    TensorOverride,
    default_output_path,
    libllama_log,
    quantize_gguf,
)
from quantmill.quantize.gguf.types import FILE_TYPES, lookup_file_type

K_TYPES = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
# hidden 256 keeps most rows K-quant compatible; ffn 320 gives ffn_down rows of 320 (not a multiple of 256)
SHAPE = TinyShape(n_layer=2, hidden=256, heads=4, kv_heads=2, ffn=320)
TYPES = ["F16", "BF16", "Q8_0", "Q5_1", "Q4_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_S", "Q2_K", "IQ4_NL"]


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("quant_src") / "tiny-F32.gguf"
    write_tiny_gguf(path, bpe_vocab(), SHAPE, tied=False)
    return path


def _load_with_libllama(path: Path) -> tuple[int, float]:
    """(llama_model_ftype, libllama's own bits per weight) of a GGUF loaded by llama-cpp-python."""
    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    with libllama_log():
        model = llama_cpp.llama_model_load_from_file(os.fsencode(path), params)
    assert model, f"libllama could not load {path}"
    try:
        bpw = 8.0 * llama_cpp.llama_model_size(model) / llama_cpp.llama_model_n_params(model)
        return int(llama_cpp.llama_model_ftype(model)), bpw
    finally:
        llama_cpp.llama_model_free(model)


def test_type_table_matches_libllama() -> None:
    import llama_cpp

    for row in FILE_TYPES.values():
        constant = "LLAMA_FTYPE_ALL_F32" if row.name == "F32" else f"LLAMA_FTYPE_MOSTLY_{row.name}"
        assert getattr(llama_cpp, constant) == row.ftype_value, row.name
    assert FILE_TYPES["Q4_K_M"].nominal_bpw == 4.5
    assert FILE_TYPES["Q6_K"].nominal_bpw == pytest.approx(6.5625)
    assert FILE_TYPES["Q8_0"].nominal_bpw == 8.5
    assert not any(FILE_TYPES[name].needs_imatrix for name in ("Q4_0", "Q2_K", "Q3_K_S", "Q4_K_M", "Q6_K", "F16"))
    assert FILE_TYPES["IQ2_XS"].needs_imatrix
    assert lookup_file_type("q4_k") is FILE_TYPES["Q4_K_M"]


def test_unknown_type_lists_valid_names() -> None:
    with pytest.raises(UserInputError) as err:
        lookup_file_type("Q4_K_XL")
    assert "Q4_K_M" in str(err.value) and "Q8_0" in str(err.value)


@pytest.mark.parametrize("type_name", TYPES)
def test_quantize_reports_real_tensor_types(f32_gguf: Path, tmp_path: Path, type_name: str, capfd: pytest.CaptureFixture[str]) -> None:
    spec = FILE_TYPES[type_name]
    result = quantize_gguf(f32_gguf, type_name, tmp_path / f"tiny-{type_name}.gguf", threads=2)
    assert capfd.readouterr().err == "", "libllama's log must not reach stderr"
    assert result.output.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [result.output.name], "no temporary file left behind"

    ftype, libllama_bpw = _load_with_libllama(result.output)
    assert ftype == spec.ftype_value
    summary = summarize_gguf(result.output)
    assert summary == result.summary
    assert summary.file_type == spec.ftype_value
    assert summary.bpw == pytest.approx(libllama_bpw, rel=1e-9)

    types = summary.tensor_types()
    rows = {t.name: t.row_length for t in summary.tensors}
    for name, tensor_type in types.items():
        if name.endswith("norm.weight"):
            assert tensor_type == "F32", name
        if rows[name] % 256:
            assert tensor_type not in K_TYPES, f"{name}: row {rows[name]} cannot hold {tensor_type}"
    assert types["blk.0.attn_q.weight"] == spec.base_type.name

    # every fallback libllama logged is a tensor whose row length forced it, and the file agrees
    for fb in result.fallbacks:
        assert fb.row_length == rows[fb.tensor] and fb.row_length % 256 != 0
        assert types[fb.tensor] == fb.used and fb.wanted in K_TYPES
    if spec.base_type.name in K_TYPES:
        assert {fb.tensor for fb in result.fallbacks} == {"blk.0.ffn_down.weight", "blk.1.ffn_down.weight"}
    else:
        assert result.fallbacks == ()


def test_q4_k_m_fallbacks_are_legacy_types(f32_gguf: Path, tmp_path: Path) -> None:
    result = quantize_gguf(f32_gguf, "Q4_K_M", tmp_path / "out.gguf", threads=2)
    types = result.summary.tensor_types()
    assert types["blk.0.ffn_down.weight"] == "Q5_0"  # Q4_K wanted, row 320
    assert types["blk.1.ffn_down.weight"] == "Q8_0"  # Q6_K wanted by the _M mix, row 320
    by_type = result.summary.by_type
    assert by_type["Q5_0"].n_tensors == 1 and by_type["Q8_0"].n_tensors == 1
    assert sum(t.n_bytes for t in by_type.values()) == result.summary.tensor_bytes
    assert 4.5 < result.summary.bpw < 6.0


def test_override_tensor(f32_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "over.gguf"
    code = main(["quantize", "gguf", str(f32_gguf), "--type", "Q4_K_S", "--out", str(out),
                 "--override-tensor", r"attn_v\.weight=q8_0", "--override-tensor", "ffn_gate=Q6_K", "--threads", "2"])
    assert code == 0
    # the two ffn_down tensors (rows not a multiple of 256) fell back: one grouped line, not one per tensor
    report = capsys.readouterr().out.splitlines()
    start = report.index("2 tensor(s) fell back: rows not a multiple of the block size:")
    assert len(report) == start + 2 and re.fullmatch(r"  2 x Q4_K -> \w+ \(row length \d+\), e\.g\. blk\.0\.ffn_down\.weight", report[-1])
    types = summarize_gguf(out).tensor_types()
    assert types["blk.0.attn_v.weight"] == types["blk.1.attn_v.weight"] == "Q8_0"
    assert types["blk.0.ffn_gate.weight"] == "Q6_K"
    assert types["blk.0.attn_q.weight"] == "Q4_K"


def test_output_is_deterministic(f32_gguf: Path, tmp_path: Path) -> None:
    a = quantize_gguf(f32_gguf, "Q4_K_M", tmp_path / "a.gguf", threads=2).output.read_bytes()
    b = quantize_gguf(f32_gguf, "Q4_K_M", tmp_path / "b.gguf", threads=1).output.read_bytes()
    assert a == b


def test_default_output_name(tmp_path: Path) -> None:
    q4km = FILE_TYPES["Q4_K_M"]
    assert default_output_path(tmp_path / "Model-135M-F16.gguf", q4km).name == "Model-135M-Q4_K_M.gguf"
    assert default_output_path(tmp_path / "ggml-model-f16.gguf", q4km).name == "ggml-model-Q4_K_M.gguf"
    assert default_output_path(tmp_path / "SmolLM2.Q4_1.gguf", q4km).name == "SmolLM2-Q4_K_M.gguf"
    assert default_output_path(tmp_path / "model.gguf", q4km).name == "model-Q4_K_M.gguf"
    assert default_output_path(tmp_path / "m-bf16.gguf", FILE_TYPES["Q8_0"]) == tmp_path / "m-Q8_0.gguf"


def test_cli_default_output(f32_gguf: Path, tmp_path: Path) -> None:
    source = tmp_path / "tiny-F32.gguf"
    source.write_bytes(f32_gguf.read_bytes())
    assert main(["quantize", "gguf", str(source), "--type", "Q8_0", "--threads", "2"]) == 0
    assert summarize_gguf(tmp_path / "tiny-Q8_0.gguf").by_type["Q8_0"].n_tensors == 16


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--type", "Q4_K_XL"], "unknown GGUF quantization type"),
        (["--type", "IQ2_XS"], "needs an importance matrix"),
        (["--type", "F16", "--override-tensor", "ffn=Q8_0"], "ignores overrides"),
        (["--type", "Q4_0", "--override-tensor", "no_such_tensor=Q8_0"], "matches no tensor"),
        (["--type", "Q4_0", "--override-tensor", "ffn=Q9_9"], "unknown ggml type"),
        (["--type", "Q4_0", "--override-tensor", "ffn"], "expected REGEX=TYPE"),
        (["--type", "Q4_0", "--override-tensor", "ffn[=Q8_0"], "bad regular expression"),
    ],
)
def test_bad_requests_exit_2_without_output(
    f32_gguf: Path, tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.gguf"
    assert main(["quantize", "gguf", str(f32_gguf), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_exit_2(f32_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    assert main(["quantize", "gguf", str(not_gguf), "--type", "Q8_0"]) == 2
    assert "not a GGUF file" in capsys.readouterr().err
    assert main(["quantize", "gguf", str(tmp_path / "missing.gguf"), "--type", "Q8_0"]) == 2
    assert "no such file" in capsys.readouterr().err
    q8 = quantize_gguf(f32_gguf, "Q8_0", tmp_path / "tiny-Q8_0.gguf").output
    assert main(["quantize", "gguf", str(q8), "--type", "Q4_0", "--out", str(tmp_path / "re.gguf")]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert main(["quantize", "gguf", str(q8), "--type", "Q8_0"]) == 2
    assert "overwrite the input" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-Q8_0.gguf", "x.gguf"]
    # with the flag, libllama requantizes
    assert main(["quantize", "gguf", str(q8), "--type", "Q4_0", "--out", str(tmp_path / "re.gguf"), "--allow-requantize"]) == 0
    assert summarize_gguf(tmp_path / "re.gguf").tensor_types()["blk.0.attn_q.weight"] == "Q4_0"


def test_unwritable_output_dir(f32_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "not-a-dir"  # a file where the output directory should be: fails even as root
    blocker.write_text("x")
    assert main(["quantize", "gguf", str(f32_gguf), "--type", "Q8_0", "--out", str(blocker / "o.gguf")]) == 2
    err = capsys.readouterr().err
    assert "cannot create output directory" in err and str(blocker) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-dir"]


def _synthetic_imatrix(model: Path, path: Path, scale: float = 1.0) -> Path:
    """An imatrix file for every 2-D weight of ``model``: column c has mean (c + 1) * scale."""
    from quantmill.quantize.gguf.imatrix import Imatrix, ImatrixEntry, write_imatrix

    entries = {}
    for t in summarize_gguf(model).tensors:
        if len(t.shape) >= 2 and t.name.startswith("blk."):
            sums = (np.arange(1, t.shape[0] + 1, dtype=np.float32) * scale * 8.0).reshape(1, -1)
            entries[t.name] = ImatrixEntry(sums=sums, counts=np.array([8.0], dtype=np.float32))
    return write_imatrix(Imatrix(entries, ("synthetic",), 1, 8), path)


def test_imatrix_is_passed_to_libllama_and_recorded(f32_gguf: Path, tmp_path: Path) -> None:
    """A type that needs an imatrix is refused without one; with one, libllama gets it and the keys are recorded."""
    import gguf

    imatrix = _synthetic_imatrix(f32_gguf, tmp_path / "imatrix.gguf")
    with pytest.raises(UserInputError, match="needs an importance matrix"):
        quantize_gguf(f32_gguf, "IQ2_XS", tmp_path / "no.gguf")
    assert not (tmp_path / "no.gguf").exists()
    out = tmp_path / "iq.gguf"
    result = quantize_gguf(f32_gguf, "IQ4_XS", out, imatrix=imatrix)
    assert result.output == out and out.exists()
    reader = gguf.GGUFReader(out)
    assert reader.fields["quantize.imatrix.file"].contents() == "imatrix.gguf"
    assert reader.fields["quantize.imatrix.dataset"].contents() == "synthetic"
    assert reader.fields["quantize.imatrix.entries_count"].contents() > 0
    _load_with_libllama(out)


def test_imatrix_changes_the_quantized_weights(f32_gguf: Path, tmp_path: Path) -> None:
    """The importance weights reach the quantizer: a different imatrix gives different Q4_K bytes."""
    flat = quantize_gguf(f32_gguf, "Q4_K_M", tmp_path / "flat.gguf").output
    weighted = quantize_gguf(
        f32_gguf, "Q4_K_M", tmp_path / "weighted.gguf", imatrix=_synthetic_imatrix(f32_gguf, tmp_path / "im.gguf")
    ).output
    assert flat.read_bytes() != weighted.read_bytes()


def test_imatrix_for_another_model_is_refused(f32_gguf: Path, tmp_path: Path) -> None:
    from quantmill.quantize.gguf.imatrix import Imatrix, ImatrixEntry, write_imatrix

    name = next(t.name for t in summarize_gguf(f32_gguf).tensors if len(t.shape) >= 2 and t.name.startswith("blk."))
    bad = write_imatrix(
        Imatrix({name: ImatrixEntry(np.ones((1, 7), np.float32), np.ones(1, np.float32))}, ("x",), 1, 1),
        tmp_path / "other.gguf",
    )
    assert main(["quantize", "gguf", str(f32_gguf), "--type", "Q4_K_M", "--imatrix", str(bad),
                 "--out", str(tmp_path / "o.gguf")]) == 2
    assert not (tmp_path / "o.gguf").exists()


def test_override_parse() -> None:
    override = TensorOverride.parse(r"blk\.[0-9]+\.ffn_down=q6_k")
    assert override.pattern == r"blk\.[0-9]+\.ffn_down" and override.tensor_type.name == "Q6_K"


@pytest.mark.slow
def test_smollm2_q4_k_m_falls_back_on_576_wide_rows(smollm2_gguf: Path, tmp_path: Path) -> None:
    """SmolLM2's hidden size (576) is not a multiple of 256: most K-quant tensors fall back."""
    try:
        from quantmill.convert.hf_to_gguf import convert_hf_to_gguf
        from quantmill.default_model import default_reference
    except ImportError as exc:  # pragma: no cover - until the converter lands
        pytest.skip(f"HF->GGUF converter not available: {exc}")
    f16 = tmp_path / "SmolLM2-F16.gguf"
    convert_hf_to_gguf(default_reference(), "f16", f16)
    result = quantize_gguf(f16, "Q4_K_M", threads=2)
    assert result.output == tmp_path / "SmolLM2-Q4_K_M.gguf"
    types = result.summary.tensor_types()
    assert types["blk.0.attn_q.weight"] == "Q5_0"  # row 576: Q4_K → Q5_0
    assert types["blk.0.ffn_down.weight"] in {"Q4_K", "Q6_K"}  # row 1536 = 6 × 256
    # tied embeddings are quantized by the output rule, which picks Q8_0 itself for such rows (no fallback)
    assert types["token_embd.weight"] == "Q8_0"
    legacy = {n for n, t in types.items() if t in {"Q5_0", "Q8_0"} and n != "token_embd.weight"}
    assert {fb.tensor for fb in result.fallbacks} == legacy
    assert 4.5 < result.summary.bpw < 6.5


@pytest.mark.parametrize("which", ["smollm2", "f32"])
def test_summary_reader_agrees_with_gguf_py(which: str, smollm2_gguf: Path, f32_gguf: Path) -> None:
    """The summary comes from ggml's own GGUF reader; gguf-py's reader sees the same keys, tensors and sizes."""
    import gguf

    path = smollm2_gguf if which == "smollm2" else f32_gguf
    summary = summarize_gguf(path)
    plain = gguf.GGUFReader(path)
    assert summary.keys == tuple(k for k in plain.fields if not k.startswith("GGUF."))
    assert summary.architecture == plain.fields["general.architecture"].contents()
    file_type = plain.fields.get("general.file_type")
    assert summary.file_type == (file_type.contents() if file_type is not None else None)
    assert [(t.name, t.type_name, t.shape, t.n_elements, t.n_bytes) for t in summary.tensors] == [
        (t.name, t.tensor_type.name, tuple(int(d) for d in t.shape), int(t.n_elements), int(t.n_bytes)) for t in plain.tensors]
    assert summary.file_size == path.stat().st_size


def test_ggml_type_names_are_gguf_py_names() -> None:
    """libggml's type table (what quantize gguf reads) names every type as gguf-py does, with the same sizes."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from quantmill.quantize.gguf.types import ggml_types

    ours = ggml_types()
    assert {name: t.value for name, t in ours.items() if name in GGMLQuantizationType.__members__} == {
        m.name: int(m) for m in GGMLQuantizationType}
    sizes = {m.name: (ours[m.name].block_size, ours[m.name].type_size) for m in GGMLQuantizationType}
    # Q8_1 is ggml's dot-product scratch type, never stored: gguf-py 0.19 still gives its old 40-byte block
    assert {n: v for n, v in sizes.items() if n != "Q8_1"} == {m.name: GGML_QUANT_SIZES[m] for m in GGMLQuantizationType if m.name != "Q8_1"}


def test_truncated_tensor_data_is_one_line_error(f32_gguf: Path, tmp_path: Path) -> None:
    from quantmill.errors import InputFileError

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(f32_gguf.read_bytes()[:-100])
    with pytest.raises(InputFileError, match="truncated: its tensor data ends at byte"):
        summarize_gguf(cut)


def test_truncated_metadata_array_is_one_line_error(f32_gguf: Path, tmp_path: Path) -> None:
    import gguf

    from quantmill.errors import InputFileError

    tokens = gguf.GGUFReader(f32_gguf).fields["tokenizer.ggml.tokens"]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(f32_gguf.read_bytes()[: tokens.offset + 200])
    with pytest.raises(InputFileError, match="malformed GGUF"):
        summarize_gguf(cut)


def test_same_bytes_as_llama_quantize(f32_gguf: Path, tmp_path: Path) -> None:
    """quantmill's libllama call and llama.cpp's own llama-quantize write the same file."""
    import subprocess

    from quantmill.reference_tools import llama_cpp_tool

    binary = llama_cpp_tool("llama-quantize")
    if not binary.is_file():
        pytest.skip("llama-quantize is not built: run `bash scripts/llama_cpp_source.sh --build` (scripts/test.sh does)")
    for type_name in ("Q4_K_M", "Q8_0"):
        theirs = tmp_path / f"llama-{type_name}.gguf"
        subprocess.run([str(binary), str(f32_gguf), str(theirs), type_name, "2"], check=True, capture_output=True)
        ours = quantize_gguf(f32_gguf, type_name, tmp_path / f"ours-{type_name}.gguf", threads=2).output
        assert ours.read_bytes() == theirs.read_bytes(), type_name
