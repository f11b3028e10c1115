"""The verify stage: every artifact measured against the checkpoint on the same token ids, as ``quantmill verify`` does.

It writes verify's one report (:mod:`quantmill.verify.report`), its paths relative to the release,
with each artifact's verdict: it must hold the recipe's thresholds (``verify.overrides`` by artifact
name, else ``verify.thresholds``) and, with ``use_default_thresholds``, its quant type's row of verify's
table. ``verify.json`` is deterministic; ``timings.json`` holds the speeds; ``report.md`` and
``parity.png`` the table and the plot. With ``verify.devices: [cpu, cuda]`` each device measures everything and the
report's ``device_parity`` compares them (verify.parity's limits).
"""
from __future__ import annotations

from quantmill.atomic import write_text_atomic
from quantmill.pipeline.context import Estimate, Output, StageContext, StageKind, StageParams
from quantmill.quantize.cost import verify_peak
from quantmill.verify.thresholds import Threshold

VERIFY_DIR = "verify"
VERIFY_JSON = "verify.json"
TIMINGS_JSON = "timings.json"
REPORT_MD = "report.md"
PLOT_PNG = "parity.png"


class VerifyParams(StageParams):
    model: str
    text: str  # a file's name (read from ctx.paths["text"]), or bundled
    text_sha256: str
    n_ctx: int
    max_chunks: int | None
    devices: tuple[str, ...]
    thresholds: Threshold
    use_default_thresholds: bool
    overrides: dict[str, Threshold]
    artifacts: dict[str, str]  # artifact name -> its path in the release
    threads: int


def run(ctx: StageContext, params: VerifyParams) -> None:
    from quantmill.calib_data.bundled import eval_file
    from quantmill.device import resolve_devices
    from quantmill.verify.backends.base import BackendOptions
    from quantmill.verify.evaluate import verify_on_devices
    from quantmill.verify.report import parity_table, report_dict, timings, write_json, write_plot
    from quantmill.verify.thresholds import DEFAULT_THRESHOLDS

    text = ctx.paths.get("text") or eval_file()
    found = {out.artifact: (path, out.dst) for path, out in ctx.outputs if out.artifact is not None}
    paths = {found[name][0]: name for name in params.artifacts}
    limits = {path: params.overrides.get(name, params.thresholds) for path, name in paths.items()}
    shown = {**{path: str(found[name][1]) for path, name in paths.items()},
             text: f"bundled:{text.name}" if params.text == "bundled" else params.text}
    result = verify_on_devices(list(paths), ctx.checkpoint(params.model), text, params.n_ctx,
                               BackendOptions(threads=params.threads), resolve_devices(params.devices, "verify.devices"),
                               max_chunks=params.max_chunks, progress=ctx.progress, limits=limits,
                               thresholds=DEFAULT_THRESHOLDS if params.use_default_thresholds else {"*": Threshold()})
    report = report_dict(result, paths, lambda p: shown.get(p, p.name))
    write_json(report, ctx.out / VERIFY_JSON)
    write_json(timings(result[0], lambda p: shown.get(p, p.name)), ctx.out / TIMINGS_JSON)
    write_text_atomic(ctx.out / REPORT_MD, parity_table(report) + "\n")
    write_plot(report, ctx.out / PLOT_PNG)


def outputs(params: VerifyParams) -> list[Output]:
    return [Output(VERIFY_JSON, f"{VERIFY_DIR}/{VERIFY_JSON}", manifest="verification"),
            *(Output(name, f"{VERIFY_DIR}/{name}") for name in (REPORT_MD, PLOT_PNG))]


def needs(params: VerifyParams) -> tuple[str, ...]:
    return ("verify-torch", *(("verify-gguf",) if any(p.endswith(".gguf") for p in params.artifacts.values()) else ()))


KIND = StageKind("verify", 1, VerifyParams, run, lambda size, p: Estimate.of(size, 1 << 20, 0.35 * (1 + len(p.artifacts)),
                                                                      lambda s: verify_peak(s.known_shape, p.n_ctx)),
                 outputs=outputs, needs=needs)
