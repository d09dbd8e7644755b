"""What the refit costs beside scoring, on SmolLM2 with the library's defaults: wall time and peak RSS of
the plan (HyWIA scoring on the packaged sample) and of `apply` without and with `reconstruct="lstsq"`
(64 packaged windows, the default `Refit.samples`), at each ratio. The peak of each phase is the
process's resident peak during it (reset before the phase where the kernel allows it), so the model's
own memory is in every figure; compare the phases with one another.

    PYTHONPATH=. python -m benchmarks.reconstruction_cost --ratios 0.2 0.5 --threads 2
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.common import RESULTS, Phase, finish, header, log, md_table, report_head, write_json


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "reconstruction_cost"))
    p.add_argument("--render", action="store_true", help="only rebuild the Markdown file from --out's JSON")
    a = p.parse_args(argv)
    if a.render:
        import json
        return render(json.loads(Path(a.out).with_suffix(".json").read_text()), Path(a.out))
    torch.set_num_threads(a.threads)
    import fxprune
    from fxprune.defaults import default_calibration
    from fxprune.data.models import load_model
    report = {**header(a.threads), "rows": []}
    model, tok = load_model()
    dg = fxprune.analyze(model)
    for ratio in a.ratios:
        cfg = fxprune.PruneConfig(ratio=ratio, reconstruct="lstsq")
        calib = default_calibration(tok, cfg)
        refit = default_calibration(tok, cfg, cfg.reconstruct.samples)
        with Phase() as scoring:
            plan = fxprune.plan(model, cfg, calibration=calib, dg=dg)
        with Phase() as plain:
            fxprune.apply(model, plan, calibration=refit, dg=dg, reconstruct=False)
        with Phase() as refitting:
            fxprune.apply(model, plan, calibration=refit, dg=dg)
        row = {"ratio": ratio, "plan": scoring.as_dict(), "apply": plain.as_dict(), "apply_lstsq": refitting.as_dict(),
               "refit_tokens": int(refit.numel())}
        report["rows"].append(row)
        log(f"r={ratio}: plan {scoring.wall_s:.1f} s / {scoring.peak_gb:.2f} GB, apply {plain.wall_s:.1f} s, "
            f"apply+lstsq {refitting.wall_s:.1f} s / {refitting.peak_gb:.2f} GB")
    finish(report)
    write_json(Path(a.out).with_suffix(".json"), report)
    render(report, Path(a.out))


def render(report: dict, out: Path) -> None:
    rows = [[f"{r['ratio']:.0%}", f"{r['plan']['wall_s']:.1f} s",
             f"{r['plan']['peak_rss_gb']:.2f} GB (+{r['plan']['peak_increase_gb']:.2f})", f"{r['apply']['wall_s']:.1f} s",
             f"{r['apply_lstsq']['wall_s']:.1f} s", f"{r['apply_lstsq']['wall_s'] - r['apply']['wall_s']:.1f} s",
             f"{r['apply_lstsq']['peak_rss_gb']:.2f} GB (+{abs(max(r['apply_lstsq']['peak_increase_gb'], 0.0)):.2f})"]
            for r in report["rows"]]
    lines = report_head("Cost of the refit beside scoring (SmolLM2-135M, library defaults)", report) + [
        "Plan: HyWIA on 32 x 128 packaged C4 tokens. Refit: `reconstruct=\"lstsq\"` (ridge chosen per projection on "
        "held-out rows) on 64 x 128 packaged tokens. Peak: resident set peak during the phase, the model included, and "
        "in brackets its rise over the resident set at the phase's start (memory the earlier phases freed is not "
        "always returned to the system, so the absolute peaks of later phases start higher).", "",
        md_table(["ratio", "plan (scoring)", "plan peak", "apply", "apply + refit", "refit alone", "apply + refit peak"],
                 rows), ""]
    out.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
