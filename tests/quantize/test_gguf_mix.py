"""Budgeted GGUF mixes (``quantize gguf --target-size/--target-bpw``): real libllama files, read back."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from tiny_gguf import TinyShape, bpe_vocab, write_tiny_gguf

from quantmill.cli import main
from quantmill.errors import UserInputError
from quantmill.quantize.gguf.inspect import summarize_gguf
from quantmill.quantize.gguf.mix import MixTarget, Option, TensorCost, choose_mix, choose_types, write_mix

# hidden 256: K-quant rows; ffn 320: ffn_down rows of 320, which only the 32-weight block types fit
SHAPE = TinyShape(n_layer=2, hidden=256, heads=4, kv_heads=2, ffn=320)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny F32 GGUF and an importance matrix for it (column c of every weight: mean c + 1)."""
    from quantmill.quantize.gguf.imatrix import Imatrix, ImatrixEntry, write_imatrix

    root = tmp_path_factory.mktemp("mix")
    source = root / "tiny-F32.gguf"
    write_tiny_gguf(source, bpe_vocab(), SHAPE, tied=False)
    entries = {t.name: ImatrixEntry(np.arange(1, t.shape[0] + 1, dtype=np.float32).reshape(1, -1) * 8.0,
                                    np.array([8.0], dtype=np.float32))
               for t in summarize_gguf(source).tensors if len(t.shape) >= 2 and t.name.startswith("blk.")}
    return source, write_imatrix(Imatrix(entries, ("synthetic",), 1, 8), root / "imatrix.gguf")


@pytest.mark.parametrize("bpw, size", [(3.0, None), (4.6, None), (6.5, None), (None, 0.16), (None, 0.2)],
                         ids=["3.0bpw", "4.6bpw", "6.5bpw", "size-0.16", "size-0.2"])
def test_a_mix_never_exceeds_its_budget_and_gets_the_planned_types(model: tuple[Path, Path], tmp_path: Path,
                                                                  bpw: float | None, size: float | None) -> None:
    source, imatrix = model
    # a size target: that fraction of the F32 source's file (0.16: about 5 bits per weight)
    target = MixTarget(bpw=bpw, size=None if size is None else int(size * source.stat().st_size))
    plan = choose_mix(source, imatrix, target)
    result = write_mix(plan, tmp_path / "mix.gguf")
    summary = summarize_gguf(result.output)
    if target.bpw is not None:
        assert summary.bpw <= target.bpw
        assert summary.bpw > target.bpw - 0.6  # the budget is used, not just met
    else:
        assert target.size is not None
        assert summary.file_size <= target.size
        assert plan.predicted_size >= summary.file_size
    written = summary.tensor_types()
    assert {name: written[name] for name in plan.types} == plan.types
    assert abs(summary.bpw - plan.bpw) < 1e-3  # the plan's byte count is libllama's
    assert len(set(plan.types.values())) > 1  # a mix, not one type


def test_the_measured_blocks_are_the_blocks_libllama_writes(model: tuple[Path, Path], tmp_path: Path) -> None:
    """What the mix measures is what the file holds: ggml_quantize_chunk with the imatrix gives libllama's bytes."""
    from gguf import GGUFReader

    from quantmill.quantize.gguf.imatrix import imatrix_means, read_imatrix
    from quantmill.quantize.gguf.tensor_error import quantize_rows
    from quantmill.quantize.gguf.types import ggml_type

    source, imatrix = model
    plan = choose_mix(source, imatrix, MixTarget(bpw=4.6))
    out = write_mix(plan, tmp_path / "mix.gguf").output
    means = imatrix_means(read_imatrix(imatrix))
    src = {t.name: t for t in GGUFReader(source).tensors}
    written = {t.name: t for t in GGUFReader(out).tensors}
    checked = 0
    for name, type_name in plan.types.items():
        weights = np.asarray(src[name].data, dtype=np.float32).reshape(-1, int(src[name].shape[0]))
        blocks = quantize_rows(weights, ggml_type(type_name), means.get(name))
        assert np.array_equal(blocks.reshape(-1), np.asarray(written[name].data).reshape(-1).view(np.uint8)), name
        checked += 1
    assert checked == len(plan.types) > 5


def test_the_chosen_types_are_deterministic(model: tuple[Path, Path], tmp_path: Path) -> None:
    source, imatrix = model
    first = write_mix(choose_mix(source, imatrix, MixTarget(bpw=4.0)), tmp_path / "a.gguf").output
    second = write_mix(choose_mix(source, imatrix, MixTarget(bpw=4.0)), tmp_path / "b.gguf").output
    assert first.read_bytes() == second.read_bytes()


def _random_costs(rng: np.random.Generator, tensors: int, options: int) -> list[TensorCost]:
    costs = []
    for i in range(tensors):
        sizes = np.sort(rng.choice(np.arange(10, 200), size=options, replace=False)) * 32
        errors = np.sort(rng.random(options) * 10)[::-1]
        costs.append(TensorCost(f"t{i}", (1, 1), [Option(f"T{j}", int(s), float(e)) for j, (s, e) in enumerate(zip(sizes, errors, strict=True))],
                                gain=float(rng.random() + 0.1)))
    return costs


@pytest.mark.parametrize("seed", range(20))
def test_the_knapsack_fits_and_is_near_the_exhaustive_optimum(seed: int) -> None:
    rng = np.random.default_rng(seed)
    costs = _random_costs(rng, 4, 4)
    smallest = sum(c.options[0].n_bytes for c in costs)
    largest = sum(c.options[-1].n_bytes for c in costs)
    budget = int(rng.integers(smallest, largest + 1))
    chosen = choose_types(costs, budget)

    def value(types: dict[str, str]) -> float:
        return sum(c.gain * c.option(types[c.name]).error for c in costs)

    assert sum(c.option(chosen[c.name]).n_bytes for c in costs) <= budget
    best = min(value(dict(zip([c.name for c in costs], combo, strict=True)))
               for combo in itertools.product(*[[o.type_name for o in c.options] for c in costs])
               if sum(c.option(t).n_bytes for c, t in zip(costs, combo, strict=True)) <= budget)
    # the greedy solves the relaxed problem: at most one tensor's step from the optimum
    step = max(c.gain * (c.options[0].error - c.options[-1].error) for c in costs)
    assert best <= value(chosen) <= best + step
    assert chosen == choose_types(costs, budget)


def test_a_budget_below_the_smallest_types_is_refused_before_any_output(model: tuple[Path, Path], tmp_path: Path) -> None:
    source, imatrix = model
    with pytest.raises(UserInputError, match="raise --target-size"):
        choose_mix(source, imatrix, MixTarget(bpw=2.7))  # above Q2_K, but ffn_down's rows of 320 fit no K-quant
    with pytest.raises(UserInputError, match="must be above 2.625"):
        MixTarget(bpw=1.5)
    with pytest.raises(UserInputError, match="exactly one budget"):
        MixTarget(size=10, bpw=4.0)
    assert not list(tmp_path.iterdir())


def test_cli_writes_a_mix_and_its_report(model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    source, imatrix = model
    out, report = tmp_path / "tiny-QM.gguf", tmp_path / "mix.json"
    assert main(["quantize", "gguf", str(source), "--imatrix", str(imatrix), "--target-bpw", "5.0", "--out", str(out),
                 "--report", str(report)]) == 0
    text = capsys.readouterr().out
    assert "mix QM-5 for 5 bpw" in text
    record = json.loads(report.read_text())
    assert record["types"] == {k: v for k, v in summarize_gguf(out).tensor_types().items() if k in record["types"]}
    assert record["bpw"] <= 5.0
    first = out.read_bytes()
    # the same command again replaces its own two outputs, with the same bytes
    assert main(["quantize", "gguf", str(source), "--imatrix", str(imatrix), "--target-bpw", "5.0", "--out", str(out),
                 "--report", str(report)]) == 0
    assert out.read_bytes() == first and json.loads(report.read_text())["types"] == record["types"]


@pytest.mark.parametrize("args, message", [
    (["--target-bpw", "5"], "pass --imatrix"),
    (["--type", "Q4_K_M", "--target-bpw", "5"], "not both"),
    ([], "pass --type"),
    (["--target-bpw", "2.7", "--imatrix", "IM"], "raise --target-size"),
    (["--target-bpw", "1.2", "--imatrix", "IM"], "must be above 2.625"),
    (["--target-bpw", "5", "--imatrix", "IM", "--report", "IM"], "--report"),
    (["--target-bpw", "5", "--imatrix", "IM", "--report", "NOTES"], "is not an earlier quantize gguf output"),
])
def test_cli_refusals_are_one_line_with_exit_2(model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                args: list[str], message: str) -> None:
    from conftest import error_lines

    source, imatrix = model
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}', encoding="utf-8")
    args = [{"IM": str(imatrix), "NOTES": str(notes)}.get(a, a) for a in args]
    out = tmp_path / "out.gguf"
    assert main(["quantize", "gguf", str(source), "--out", str(out), *args]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and message in lines[0]
    assert not out.exists()
    assert notes.read_text(encoding="utf-8") == '{"mine": 1}'  # never overwritten


def test_refined_gains_predict_the_kld_of_one_tensor(model: tuple[Path, Path], tmp_path: Path) -> None:
    """With --refine the gains come from the float model: for a probed tensor, gain × error is the KLD measured."""
    from quantmill.convert.gguf_to_hf import gguf_to_hf
    from quantmill.quantize.gguf.imatrix import imatrix_means, read_imatrix
    from quantmill.quantize.gguf.mix import measure_costs
    from quantmill.quantize.gguf.sensitivity import measure_gains, probe_type

    source, imatrix = model
    reference = gguf_to_hf(source, tmp_path / "hf", dtype="float32", progress=False)
    means = imatrix_means(read_imatrix(imatrix))
    costs, *_ = measure_costs(source, means, max_rows=None)
    ids = np.random.default_rng(0).integers(0, 300, size=(2, 32))
    gains = measure_gains(reference, source, means, [(c.name, probe_type([o.type_name for o in c.options])) for c in costs], ids)
    assert set(gains) == {c.name for c in costs}
    assert all(np.isfinite(g) and g > 0 for g in gains.values())
    plan = choose_mix(source, imatrix, MixTarget(bpw=4.6), refine_with=reference, token_ids=ids)
    assert plan.refined and plan.method["gain_tokens"] == [2, 32]
    assert plan.predicted > 0
    assert plan.record()["gains"] == gains  # the same tokens: the same gains
    # the gains do not depend on the budget: another budget reuses them (--gains-from) without measuring again
    reused = choose_mix(source, imatrix, MixTarget(bpw=4.6), gains=plan.record()["gains"])
    assert reused.types == plan.types and reused.predicted == plan.predicted and reused.refined
    with pytest.raises(UserInputError, match="no gain for tensor"):
        choose_mix(source, imatrix, MixTarget(bpw=4.6), gains={"blk.0.attn_q.weight": 1.0})
