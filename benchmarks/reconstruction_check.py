"""Does reconstruction help on SmolLM2? Perplexity on the calibration text itself, on held-out C4 text and on
WikiText-2, for one plan pruned without reconstruction, with the bias correction and with the ridge refit.

A refit that lowers the calibration perplexity but raises the held-out ones over-fits; one that raises all
three does not match what the LM loss needs. Plan: fxprune.plan's defaults at 20%, scored on the calibration
draw; the same plan is applied in every mode.

    PYTHONPATH=. FXPRUNE_DATA_DIR=... python -m benchmarks.reconstruction_check --samples 32
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from benchmarks.common import RESULTS, data_dir, finish, header, md_table, report_head, write_json


@torch.inference_mode()
def perplexity(model, windows) -> float:
    total = 0.0
    for chunk in windows.split(8):
        logits = model(chunk, attention_mask=torch.ones_like(chunk)).logits
        total += float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), chunk[:, 1:].flatten(),
                                                         reduction="sum"))
    return math.exp(total / windows[:, 1:].numel())


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--importance", default="flap")
    p.add_argument("--modes", nargs="+", default=["none:0", "bias:0", "lstsq:0.05", "lstsq:1.0"])
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    import fxprune
    from fxprune.data import calibration_samples
    from fxprune.evaluate import eval_windows
    from fxprune.models import load_model
    root = data_dir(args.data_dir)
    model, tok = load_model()
    c4 = root / "c4" / "c4_sample.json"
    sets = {"calibration (C4)": calibration_samples(c4, tok, args.samples, 128, seed=1),
            "held-out C4": calibration_samples(c4, tok, 16, 128, seed=7),
            "WikiText-2 (2,560 tok)": eval_windows(tok, root / "wikitext-2-raw" / "wiki.test.raw", 128, 2560)}
    cal = sets["calibration (C4)"]
    report = {**header(), "settings": vars(args), "rows": [["dense", "-"] + [perplexity(model, w) for w in sets.values()]]}
    dg = fxprune.analyze(model)
    plan = fxprune.plan(model, args.ratio, dg=dg, calibration=cal, importance=args.importance, reconstruct="none")
    import dataclasses
    for spec in args.modes:
        mode, ridge = spec.split(":")
        plan_m = fxprune.PrunePlan.from_json(plan.to_json())
        plan_m.config = dataclasses.replace(plan.config, reconstruct=mode, ridge=float(ridge))
        t0 = time.time()
        gm = fxprune.apply(model, plan_m, calibration=cal, dg=dg)
        report["rows"].append([mode, ridge] + [perplexity(gm, w) for w in sets.values()] + [time.time() - t0])
    finish(report)
    write_json(RESULTS / "reconstruction_check.json", report)
    lines = report_head("Reconstruction on SmolLM2: calibration vs held-out perplexity", report)
    lines += [f"Plan: {args.importance}, {args.ratio:.0%}, library defaults otherwise, scored on {args.samples} x 128 "
              "C4 tokens (seed 1), the same plan in every mode.", "",
              md_table(["mode", "ridge", *sets, "apply s"],
                       [[r[0], r[1], *(f"{v:.2f}" for v in r[2:5]), f"{r[5]:.0f}" if len(r) > 5 else "-"]
                        for r in report["rows"]]), ""]
    (RESULTS / "reconstruction_check.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
