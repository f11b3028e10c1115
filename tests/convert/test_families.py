"""The family × stage matrix, generated from the architecture records.

Rows: every tiny replica in ``tests/families.py`` (every registered record must have one). Columns:
convert (HF → GGUF), GGUF → HF, statistics/imatrix, GPTQ, GGUF quantize, verify. A cell whose
capability the record claims must run and give a real artifact; any other cell must be refused up
front with the documented error (``architecture 'X' does not support ... (stage 'Y')``) and leave
nothing behind.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from families import FAMILIES

from quantmill.calib_data.sampling import CalibrationSet
from quantmill.convert.arch import families, for_config
from quantmill.errors import UnsupportedError
from quantmill.quantize.layerwise import read_config

PERPLEXITY = "ppl"
STAGES = ("convert", "gguf-to-hf", "statistics", "gptq", "gguf-quantize", "verify")
pytestmark = pytest.mark.slow


def test_every_registered_family_has_a_replica() -> None:
    covered = {replica.family for replica in FAMILIES.values()}
    missing = sorted(a.name for a in families() if a.name not in covered)
    assert not missing, f"registered families without a tiny replica in tests/families.py: {missing}"


def _calibration(model_dir: Path) -> CalibrationSet:
    from test_gptq_gptqmodel import TEXT

    from quantmill.calib_data.loaders import CalibrationText
    from quantmill.calib_data.sampling import load_tokenize, sample_sequences

    return sample_sequences(CalibrationText("ayli", (TEXT,)), load_tokenize(model_dir), samples=4, seqlen=48, seed=0)


def _refused(stage: str, call, out: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UnsupportedError, match="does not support|not supported") as info:
        call()
    assert "\n" not in str(info.value)
    assert not out.exists() or not any(out.iterdir() if out.is_dir() else [out]), f"{stage} left {out} behind"


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path, sentencepiece_tokenizer_dir: Path):  # type: ignore[no-untyped-def]
    """Each replica built once for the module, and its GGUF files converted once (the cells only read them)."""
    from quantmill.convert.hf_to_gguf import convert_hf_to_gguf

    built: dict[str, Path] = {}
    ggufs: dict[tuple[str, str], Path] = {}
    root = tmp_path_factory.mktemp("replicas")

    def model(name: str) -> Path:
        if name not in built:
            replica = FAMILIES[name]
            tokenizer_dir = smollm2_tokenizer_dir if replica.vocab == "bpe" else sentencepiece_tokenizer_dir
            built[name] = replica.build(root / name, tokenizer_dir, "float32")
        return built[name]

    def gguf(name: str, outtype: str) -> Path:
        if (name, outtype) not in ggufs:
            [ggufs[name, outtype]] = convert_hf_to_gguf(model(name), outtype, root / f"{name}-{outtype}.gguf", progress=False)
        return ggufs[name, outtype]

    return model, gguf


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("replica", sorted(FAMILIES))
def test_family_stage_cell(replica: str, stage: str, replicas, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from quantmill.convert.hf_to_gguf import convert_hf_to_gguf

    build, convert = replicas
    model = build(replica)
    arch = for_config(read_config(model), model / "config.json")
    assert arch.name == FAMILIES[replica].family
    capability = {"statistics": "statistics", "verify": "verify-torch"}.get(stage, stage)
    out = tmp_path / "out"

    def gguf(outtype: str = "f16") -> Path:
        return convert(replica, outtype)  # type: ignore[no-any-return]

    if stage == "convert":
        import gguf as gguf_py

        if not arch.supports("convert"):
            _refused(stage, lambda: convert_hf_to_gguf(model, "f16", out, progress=False), out)
            return
        reader = gguf_py.GGUFReader(gguf())
        assert reader.fields["general.architecture"].contents() == arch.gguf_name
    elif stage == "gguf-to-hf":
        from safetensors.numpy import load_file

        from quantmill.convert.gguf_to_hf import gguf_to_hf, permute_rows

        source = gguf("f32")
        if not arch.supports("gguf-to-hf"):
            _refused(stage, lambda: gguf_to_hf(source, out, dtype="float32", progress=False), out)
            return
        gguf_to_hf(source, out, dtype="float32", progress=False)
        original, back = load_file(str(model / "model.safetensors")), load_file(str(out / "model.safetensors"))
        assert sorted(back) == sorted(k for k in original if not (k == "lm_head.weight" and k not in back))
        for name, value in back.items():
            np.testing.assert_array_equal(value, original[name], err_msg=name)
        del permute_rows
    elif stage == "statistics":
        from quantmill.quantize.gguf.imatrix import imatrix_from_stats, read_imatrix, write_imatrix
        from quantmill.quantize.stats import collect_importance

        calib = _calibration(model)
        if not arch.supports("statistics"):
            _refused(stage, lambda: collect_importance(model, calib, progress=False), out)
            return
        stats = collect_importance(model, calib, progress=False)
        path = write_imatrix(imatrix_from_stats(stats, calib), tmp_path / "imatrix.gguf")
        entries = read_imatrix(path).entries
        assert decoder_linears(arch) * FAMILIES[replica].layers <= len(entries) + FAMILIES[replica].layers * 2
        assert all(np.isfinite(e.sums).all() and (e.counts == 4 * 48).all() for e in entries.values())
    elif stage == "gptq":
        from quantmill.quantize.gptq.branches import parse_branches
        from quantmill.quantize.gptq.engine import EngineOptions, quantize_branches

        calib = _calibration(model)
        call = lambda: quantize_branches(model, calib, parse_branches(["4bit-32g-actorder"]), out,  # noqa: E731
                                         EngineOptions(progress=False))
        if not arch.supports("gptq"):
            _refused(stage, call, out)
            return
        [result] = call()
        records = result.records
        assert len(records) == FAMILIES[replica].linears_per_layer * FAMILIES[replica].layers - lckv_missing_kv(model)
        assert all(np.isfinite(r.loss) for r in records)
    elif stage == "gguf-quantize":
        from quantmill.quantize.gguf.libllama import quantize_gguf

        if not arch.supports("convert"):
            pytest.skip(f"{arch.name} claims no HF -> GGUF conversion, so there is no GGUF to quantize (no registered family today)")
        source = gguf()
        target = tmp_path / "q8.gguf"
        if not arch.supports("gguf-quantize"):
            _refused(stage, lambda: quantize_gguf(source, "Q8_0", target), target)
            return
        result = quantize_gguf(source, "Q8_0", target)
        assert result.output.is_file() and result.summary.architecture == arch.gguf_name
    elif stage == "verify":
        from quantmill.verify.backends.base import BackendOptions
        from quantmill.verify.evaluate import verify_artifacts

        text = Path(__file__).resolve().parents[2] / "calib_data" / "corpora" / "eval_text.txt"
        artifacts: list[Path] = [model]
        if arch.supports("convert"):
            source = gguf()
            if not arch.supports("verify-gguf"):
                _refused("verify-gguf", lambda: verify_artifacts([source], model, text, 64, BackendOptions(threads=1),
                                                                 max_chunks=2, progress=False), out)
            else:
                artifacts.append(source)
        assert arch.supports(capability)
        result = verify_artifacts(artifacts, model, text, 64, BackendOptions(threads=1), max_chunks=2, progress=False)
        assert len(result.results) == len(artifacts)
        for row in result.results:
            assert np.isfinite(row.metrics[PERPLEXITY]), row


def decoder_linears(arch) -> int:  # type: ignore[no-untyped-def]
    return len(arch.decoder.linear_groups) if arch.decoder is not None else 0


def lckv_missing_kv(model: Path) -> int:
    """k_proj/v_proj a replica's layers do not have (LCKV layers that use another layer's KV)."""
    from safetensors import safe_open

    with safe_open(str(model / "model.safetensors"), "np") as handle:
        names = set(handle.keys())
    layers = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
    return sum(2 for i in layers if f"model.layers.{i}.self_attn.k_proj.weight" not in names)
