"""Does reconstruction help on SmolLM2? Perplexity on the refit's own text, on held-out C4 text and on
WikiText-2, for one plan applied without reconstruction and with each refit variant.

A refit that lowers the perplexity of the text it was fitted on but raises the held-out ones over-fits;
one that raises all three does not match what the LM loss needs. The plan is `fxprune.plan`'s defaults
(HyWIA on the packaged sample) at `--ratio`, made once and cached in `--plan-cache`; every variant
applies that same plan, refitted on `--samples` x 128 C4 tokens of the shared data drawn with `--seed`.
Variants are `mode:ridge:weighting` (ridge a number or "auto"). One JSON line per variant is appended
to `--out`; `--render` turns the collected lines into the Markdown results file.

    PYTHONPATH=. FXPRUNE_DATA_DIR=... python -m benchmarks.reconstruction_check --ratio 0.2 --samples 64 --seed 1 \
        --variants none:0:uniform lstsq:auto:residual
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, data_dir, header, load_average, md_table, perplexity


def parse(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=["none:0:uniform", "bias:auto:residual", "lstsq:auto:residual"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plan-cache", default="out/reconstruction_check")
    p.add_argument("--out", default=str(RESULTS / "reconstruction_check.jsonl"))
    p.add_argument("--render", action="store_true", help="only rebuild the Markdown file from --out")
    p.add_argument("--data-dir", default=None)
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.render:
        return render(Path(args.out))
    import fxprune
    from fxprune.data.loaders import calibration_samples
    from fxprune.evaluation.evaluate import eval_windows
    from fxprune.data.models import load_model
    from fxprune.reconstruction.reconstruct_layers import ReconstructLayersPass
    torch.set_num_threads(args.threads)
    root = data_dir(args.data_dir)
    model, tok = load_model()
    c4 = root / "c4" / "c4_sample.json"
    refit = calibration_samples(c4, tok, args.samples, 128, seed=args.seed)
    sets = {"held-out C4": calibration_samples(c4, tok, 16, 128, seed=7),
            "WikiText-2": eval_windows(tok, root / "wikitext-2-raw" / "wiki.test.raw", 128, 2560),
            "refit text": refit[:16]}
    dg = fxprune.analyze(model)
    cache = Path(args.plan_cache) / f"plan_{args.ratio}.json"
    if cache.exists():
        plan = fxprune.PrunePlan.from_json(cache.read_text())
    else:
        plan = fxprune.plan(model, args.ratio, dg=dg)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(plan.to_json())
    choices = {}
    original = ReconstructLayersPass.call

    def call(self, gm):  # keep what each projection chose, for the report
        result = original(self, gm)
        choices.update(collections.Counter(self.choices.values()))
        return result
    ReconstructLayersPass.call = call
    for spec in args.variants:
        mode, ridge, weighting = spec.split(":")
        refit_settings = dataclasses.replace(plan.config.reconstruct, mode=mode, weighting=weighting,
                                             ridge=ridge if ridge == "auto" else float(ridge))
        cfg = dataclasses.replace(plan.config, reconstruct=refit_settings)
        variant = fxprune.PrunePlan.from_json(plan.to_json())
        variant.config = cfg
        choices.clear()
        load, t0 = load_average(), time.time()
        gm = fxprune.apply(model, variant, calibration=refit, dg=dg)
        seconds = time.time() - t0
        row = {"ratio": args.ratio, "samples": args.samples, "seed": args.seed, "variant": spec,
               **{k: round(perplexity(gm, w), 2) for k, w in sets.items()}, "apply_s": round(seconds, 1),
               "load": load, "choices": dict(choices), "params": sum(p.numel() for p in gm.parameters()),
               "machine": header(args.threads)}
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "machine"}), flush=True)
    render(Path(args.out))


def render(path: Path, out: Path | None = None) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    first = rows[0]["machine"]
    lines = ["# Reconstruction on SmolLM2-135M-Instruct: refit text, held-out C4 and WikiText-2", "",
             f"Machine: {first['machine']['cpu']}, torch threads {first['machine']['torch_threads']}, torch "
             f"{first['machine']['torch']}; runs from {rows[0]['machine']['date']} to {rows[-1]['machine']['date']}. "
             "Written by `python -m benchmarks.reconstruction_check` (one line per run in reconstruction_check.jsonl).",
             "", "Plan: `fxprune.plan(model, ratio)` defaults (HyWIA on 32 packaged windows, heads + MLP, layers 0-2 "
             "and 28-29 kept, MLP widths in multiples of 64), the same plan in every variant of a ratio. Refit on "
             "`samples` x 128 C4 tokens drawn with `seed`; perplexity on 16 x 128 other C4 tokens (seed 7), on "
             "WikiText-2's first 2,560 tokens (128-token windows), and on 16 of the refit windows themselves. "
             "Variant = mode:ridge:weighting. Apply time includes the refit (load average at its start: the "
             "machine was shared).", ""]
    table = [[f"{r['ratio']:.0%}", r["samples"], r["seed"], r["variant"], f"{r['held-out C4']:.2f}",
              f"{r['WikiText-2']:.2f}", f"{r['refit text']:.2f}", f"{r['apply_s']:.0f}",
              r["load"][0] if r["load"] else "-",
              ", ".join(f"{k} {v}" for k, v in sorted(r["choices"].items())) or "-"] for r in rows]
    lines.append(md_table(["ratio", "samples", "seed", "variant", "held-out C4", "WikiText-2 (2,560)", "refit text",
                           "apply s", "load", "per-projection choice"], table))
    text = "\n".join(lines) + "\n"
    (out or RESULTS / "reconstruction_check.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
