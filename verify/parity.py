"""CPU↔GPU parity: the same artifacts measured on several devices, and whether their figures agree.

Each device measures the reference and every artifact itself (its KLD is against the reference run on the same
device). Per artifact, the perplexity may differ by at most :data:`MAX_PPL_DIFF_PCT` percent and the mean KLD by at
most :data:`MAX_KLD_DIFF_REL` relative, or :data:`KLD_FLOOR` nats absolute, below which KLD is rounding noise
(an F16 or Q8_0 file's KLD is 1e-5 to 1e-4 nats: float reductions in another order change it by more than 5 %).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from quantmill.verify.evaluate import VerifyResult

MAX_PPL_DIFF_PCT = 0.2
MAX_KLD_DIFF_REL = 0.05
KLD_FLOOR = 1e-4


def _rel_pct(value: float, base: float) -> float | None:
    return 100.0 * (value / base - 1.0) if math.isfinite(value) and math.isfinite(base) and base else None


def device_parity(results: Sequence[VerifyResult], name: Callable[[Path, bool], str]) -> dict[str, Any]:
    """The parity record of ``results`` (one per device, the first the baseline): per artifact and device, its
    perplexity and mean KLD, their differences from the baseline device and a verdict. ``name(path, is_reference)``
    names an artifact as the report does."""
    base = results[0]
    rows = []
    for index, first in enumerate(base.results):
        figures = {r.device: r.results[index] for r in results}
        row: dict[str, Any] = {"name": name(first.path, first.is_reference), "is_reference": first.is_reference,
                               "ppl": {d: a.ppl for d, a in figures.items()},
                               "kld_mean": {d: a.metrics.get("kld_mean") for d, a in figures.items()}}
        failures = []
        for device, other in list(figures.items())[1:]:
            ppl_diff = _rel_pct(other.ppl, first.ppl)
            row.setdefault("ppl_diff_pct", {})[device] = ppl_diff
            if ppl_diff is None or abs(ppl_diff) > MAX_PPL_DIFF_PCT:
                failures.append(f"{device} perplexity {other.ppl:.4f} vs {base.device} {first.ppl:.4f} "
                                f"({'n/a' if ppl_diff is None else f'{ppl_diff:+.3f}'} %, limit ±{MAX_PPL_DIFF_PCT} %)")
            if first.is_reference:
                continue
            kld, kld_base = other.metrics.get("kld_mean", math.nan), first.metrics.get("kld_mean", math.nan)
            kld_diff = _rel_pct(kld, kld_base)
            row.setdefault("kld_diff_pct", {})[device] = kld_diff
            close = math.isfinite(kld) and math.isfinite(kld_base) and (
                abs(kld - kld_base) <= KLD_FLOOR or abs(kld - kld_base) <= MAX_KLD_DIFF_REL * abs(kld_base))
            if not close:
                failures.append(f"{device} mean KLD {kld:.6f} vs {base.device} {kld_base:.6f} (limit ±{100 * MAX_KLD_DIFF_REL:.0f} % "
                                f"or {KLD_FLOOR} nats)")
        row["verdict"] = "pass" if not failures else "FAIL"
        row["failures"] = failures
        rows.append(row)
    return {"devices": [r.device for r in results], "baseline": base.device,
            "limits": {"max_ppl_diff_pct": MAX_PPL_DIFF_PCT, "max_kld_diff_rel": MAX_KLD_DIFF_REL, "kld_floor": KLD_FLOOR},
            "passed": all(row["verdict"] == "pass" for row in rows), "artifacts": rows}


def _cell(value: float | None, fmt: str) -> str:
    return format(value, fmt) if value is not None and math.isfinite(value) else "—"


def parity_markdown(parity: Mapping[str, Any]) -> str:
    """The device table: per artifact, each device's perplexity and mean KLD, the differences and the verdict."""
    devices, base = parity["devices"], parity["baseline"]
    others = [d for d in devices if d != base]
    head = ["artifact", *(f"ppl {d}" for d in devices), *(f"Δppl % {d}" for d in others),
            *(f"mean KLD {d}" for d in devices), *(f"ΔKLD % {d}" for d in others), "verdict"]
    limits = parity["limits"]
    lines = [f"Devices: {', '.join(devices)} (baseline {base}); limits: perplexity ±{limits['max_ppl_diff_pct']} %, mean KLD "
             f"±{100 * limits['max_kld_diff_rel']:.0f} % or {limits['kld_floor']} nats", "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 2) + "---|"]
    for row in parity["artifacts"]:
        cells = [row["name"], *(_cell(row["ppl"][d], ".4f") for d in devices),
                 *(_cell(row.get("ppl_diff_pct", {}).get(d), "+.4f") for d in others),
                 *(_cell(row["kld_mean"][d], ".6f") for d in devices),
                 *(_cell(row.get("kld_diff_pct", {}).get(d), "+.2f") for d in others), row["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [f"\n{row['name']}: {'; '.join(row['failures'])}" for row in parity["artifacts"] if row["failures"]]
    return "\n".join(lines)
