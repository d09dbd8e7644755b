"""Every importance method x {no reconstruction, bias, least squares} x ratio x calibration draw on SmolLM2.

Each draw is `--calib-samples` windows of `--calib-len` tokens from `--calib-source` (default the C4
sample; seeded by the draw); gradients and activation statistics are computed once per draw and shared
by the methods and ratios. Quality: WikiText-2 perplexity on the first `--eval-tokens` tokens of the test
split in 128-token windows (text no method was tuned on: calibrating on WikiText-2's validation split is
the in-domain setting, still disjoint), and optionally on C4 windows (`--c4-eval`). Results accumulate in
JSON, one cell at a time, so a run can be resumed (`--resume`) or extended with more ratios or draws; the
Markdown table and plot are rebuilt from all cells.

    PYTHONPATH=. python -m benchmarks.reconstruction_table --ratios 0.2 0.5 --draws 1 2 3
"""
from __future__ import annotations

import argparse
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from benchmarks.common import RESULTS, Phase, data_dir, finish, header, log, md_table, perplexity, report_head, write_json
from fxprune.reconstruction.settings import PRECISIONS as REFIT_PRECISIONS, TARGETS as REFIT_TARGETS, Refit

METHODS = {  # name -> (importance, allocation)
    "l2": ("l2", "uniform"), "element1": ("element1", "uniform"), "vector": ("vector", "uniform"),
    "element2": ("element2", "uniform"), "hywia": ("hywia", "uniform"), "hywia2": ("hywia2", "uniform"),
    "wanda": ("wanda", "uniform"), "obs": ("obs", "uniform"), "obs+AB": ("obs", "absolute"),
    "flap": ("flap", "uniform"), "flap+AL": ("flap", "flap"), "random": ("random", "uniform"),
}
MODES = ("none", "bias", "lstsq")
MODE_NAMES = {"none": "none", "bias": "bias (FLAP-style bias)", "lstsq": "lstsq (ridge refit)"}
# hywia2: HyWIA with the paper's two granularities only (element1, vector), fxprune's HyWIA before the
# activation-aware pair joined it.
PAPER_PAIR = {"granularities": ("fine", "coarse")}


def ppl_key(text: str) -> str:
    """Cell key of the perplexity on one evaluation text: WikiText-2 is the table's `ppl`, others `ppl_<name>`."""
    return "ppl" if text == "wikitext" else f"ppl_{text}"


def run_draw(model, tok, dg, windows, draw, args, cells, save):
    import fxprune
    from fxprune.data.calibration import Calibration
    from fxprune.planning.plan import target_groups
    from fxprune.planning.refit_choice import choose_after_refit
    from fxprune.scoring import HyWIA, compute_gradients, hywia, score
    from fxprune.scoring.activations import gram_members, input_statistics
    from fxprune.scoring.gradients import member_names
    source = data_dir(args.data_dir) / args.calib_source
    calib = Calibration.from_text(tok, source, args.calib_samples, args.calib_len, seed=draw)
    # The refit reads its own windows, as compile() does with Refit.samples (same seed as the scoring draw).
    refit = calib if not args.refit_samples else Calibration.from_text(
        tok, source, args.refit_samples, args.calib_len, seed=draw)
    base = fxprune.PruneConfig(ratio=0.2, targets=tuple(args.targets), calibration_samples=args.calib_samples)
    groups = target_groups(dg, base)
    shared = {}
    if {"element1", "vector", "element2", "hywia", "hywia2"} & set(args.methods):
        with Phase() as p:
            shared["gradients"] = compute_gradients(dg, calib, [m.name for g in groups for m in g.members],
                                                    second_order="element2" in args.methods, batch_size=1)
        log(f"draw {draw}: gradient pass {p.wall_s:.1f} s, peak {p.peak_gb:.2f} GB")
        cells.setdefault("_cost", {})[f"gradients/{draw}"] = {"s": p.wall_s, "peak_gb": p.peak_gb}
    if {"wanda", "flap", "flap+AL", "hywia", "obs", "obs+AB"} & set(args.methods):
        gram = gram_members(groups) if {"obs", "obs+AB"} & set(args.methods) else ()
        with Phase() as p:  # obs also reads the Gram matrix of each projection's inputs
            shared["inputs"] = input_statistics(dg, calib, member_names(dg, groups), gram=gram)
        phase = "inputs+gram" if gram else "inputs"
        log(f"draw {draw}: activation statistics ({phase}) {p.wall_s:.1f} s, peak {p.peak_gb:.2f} GB")
        cells.setdefault("_cost", {})[f"{phase}/{draw}"] = {"s": p.wall_s, "peak_gb": p.peak_gb}
    fixed = {}
    for ratio in args.ratios:
        for method in args.methods:
            importance, allocation = METHODS[method]
            todo = [m for m in args.modes if f"{method}/{m}/{ratio}/{draw}" not in cells]
            if not todo:
                continue
            with Phase() as sp:
                chosen = {}
                if importance.startswith("hywia"):
                    importance = HyWIA(**(PAPER_PAIR if importance == "hywia2" else {}),
                                       after_refit=args.hywia_after_refit)
                    # the masked validation only decides the cells without a refit when the refit judges the rest
                    masked = "none" in todo or not importance.after_refit
                    res = hywia(dg, groups, calib, ratio=ratio, gradients=shared.get("gradients"),
                                inputs=shared.get("inputs"), settings=replace(importance, validate=masked))
                    scores = res.scores
                    chosen = {"choice": res.choice, "validation": res.validation}  # which ranking won, and why
                else:
                    if importance not in fixed:  # these scores do not depend on the ratio
                        fixed[importance] = score(dg, groups, importance, calib, seed=draw,
                                                  gradients=shared.get("gradients"), inputs=shared.get("inputs"))
                    scores = fixed[importance]
            for mode in todo:
                cfg = base.__class__(**{**base.to_dict(), "ratio": ratio, "importance": importance,
                                        "allocation": allocation, "reconstruct": Refit(
                                            mode=mode, target=args.refit_target, precision=args.refit_precision)})
                plan_scores, judged = scores, chosen
                if isinstance(importance, HyWIA) and importance.after_refit and mode != "none":  # as fxprune.plan
                    with Phase() as vp:
                        pick = choose_after_refit(dg, cfg, res.candidates(), calib, importance.holdout)
                    plan_scores = pick.scores
                    judged = {"choice": pick.name, "validation": pick.losses, "judged": "after refit",
                              "validation_s": vp.wall_s}
                plan = fxprune.plan(model, config=cfg, scores=plan_scores, dg=dg)
                with Phase() as ap:
                    gm = fxprune.apply(model, plan, calibration=refit, dg=dg)
                ppl = {ppl_key(k): perplexity(gm, w) for k, w in windows.items()}
                cells[f"{method}/{mode}/{ratio}/{draw}"] = {
                    **ppl, "removed": plan.removed_fraction, "params_after": plan.params_after,
                    "score_s": sp.wall_s, "apply_s": ap.wall_s, "apply_peak_gb": ap.peak_gb, **judged}
                log(f"{method:9s} {mode:5s} r={ratio} draw {draw}: apply {ap.wall_s:5.1f} s  removed "
                    f"{plan.removed_fraction:.4f}" + "".join(f"  {k} {v:.2f}" for k, v in ppl.items()))
                save()
                del gm


def summary(cells, methods, modes, ratios, draws, key="ppl"):
    rows = []
    for method in methods:
        for mode in modes:
            row = [method, mode]
            for r in ratios:
                v = [cells[k][key] for d in draws if key in cells.get(k := f"{method}/{mode}/{r}/{d}", {})]
                row.append(f"{sum(v) / len(v):.1f} [{min(v):.1f}-{max(v):.1f}]" if v else "-")
            rows.append(row)
    return rows


def write_report(report, path: Path):
    cells, s = report["cells"], report["settings"]
    measured = {tuple(k.split("/")): c for k, c in cells.items() if not k.startswith("_")}  # (method, mode, ratio, draw)
    ratios = sorted({float(r) for _, _, r, _ in measured})
    draws = sorted({int(d) for *_, d in measured})
    methods = [m for m in METHODS if any(k[0] == m for k in measured)]
    modes = [m for m in MODES if any(k[1] == m for k in measured)]
    lines = report_head("Importance x reconstruction on SmolLM2-135M", report)
    if len(report.get("runs", [])) > 1:
        lines += ["The cells were filled by these runs (each `--resume`d into the same JSON):", ""]
        lines += [f"- {r['date']}: `{r['command']}` (load average at start {r['load_average_start'] or 'not recorded'})"
                  for r in report["runs"]] + [""]
    lines += [f"WikiText-2 perplexity (first {s['eval_tokens']:,} tokens, 128-token windows; dense "
              f"{report['dense_ppl']:.2f}), mean [min-max] over calibration draws {draws} of "
              f"{s['calib_samples']} x {s['calib_len']} tokens of `{s.get('calib_source', 'c4/c4_sample.json')}` "
              f"(refit on {s.get('refit_samples') or s['calib_samples']} windows of the same draw, matching the dense "
              f"{s.get('refit_target', 'output')}"
              f"{', forward passes in ' + s['refit_precision'] if s.get('refit_precision', 'float32') != 'float32' else ''}"
              "); targets "
              f"{' '.join(s['targets'])}; layers {report['protected']} protected; no tuning. Methods: importance "
              "(allocation uniform unless `+AL`, FLAP's adaptive allocation, or `+AB`, the absolute allocation: one "
              "ranking of obs's errors per parameter; hywia2: HyWIA with the paper's two granularities). Modes: "
              + ", ".join(MODE_NAMES[m] for m in modes) + ".", "",
              md_table(["method", "reconstruction"] + [f"{r:.0%}" for r in ratios],
                       summary(cells, methods, modes, ratios, draws)), ""]
    if any("ppl_c4" in c for c in measured.values()):
        lines += [f"The same models on {s['c4_eval']} windows of 128 C4 tokens (seed 7; dense "
                  f"{report['dense_ppl_c4']:.2f}): text of another domain than WikiText-2, held out when the "
                  "calibration source is not the C4 sample.", "",
                  md_table(["method", "reconstruction"] + [f"{r:.0%}" for r in ratios],
                           summary(cells, methods, modes, ratios, draws, "ppl_c4")), ""]
    chosen = sorted({(m, o, float(r), int(d)): c for (m, o, r, d), c in measured.items() if "choice" in c}.items())
    if chosen:
        lines += ["HyWIA's validated choice (the ranking returned, and the mean LM loss of each candidate's pruned "
                  "model on the held-out quarter of the calibration rows, the lowest wins; judged masked, the "
                  "units zeroed at their output projection, or after the plan's refit on the other rows, as "
                  "`fxprune.plan` does when it refits):", "",
                  md_table(["method", "reconstruction", "ratio", "draw", "judged", "choice", "held-out losses"],
                           [[m, o, f"{r:.0%}", d, c.get("judged", "masked"), c["choice"],
                             ", ".join(f"{k} {v:.4f}" for k, v in c["validation"].items())]
                            for (m, o, r, d), c in chosen]), ""]
    cost = [(k, f"{v['s']:.1f} s", f"{v['peak_gb']:.2f} GB") for k, v in cells.get("_cost", {}).items()]
    for m in modes:
        applies = [c for k, c in measured.items() if k[1] == m]
        times = [c["apply_s"] for c in applies]
        cost.append((f"apply ({m})", f"mean {sum(times) / len(times):.1f} s, max {max(times):.1f} s",
                     f"{max(c['apply_peak_gb'] for c in applies):.2f} GB"))
    lines += ["Cost (wall time and peak RSS of each phase; apply = rewrite + reconstruction):", "",
              md_table(["phase", "time", "peak memory"], cost), ""]
    path.with_suffix(".md").write_text("\n".join(lines))
    plot(cells, methods, modes, ratios, draws, path.with_suffix(".png"), report)


def plot(cells, methods, modes, ratios, draws, path, report):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4.5), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, mode in zip(axes, modes):
        for method in methods:
            pts = [(r, [cells[k]["ppl"] for d in draws if (k := f"{method}/{mode}/{r}/{d}") in cells]) for r in ratios]
            pts = [(r, v) for r, v in pts if v]
            if pts:
                ax.errorbar([r for r, _ in pts], [sum(v) / len(v) for _, v in pts], marker="o", label=method,
                            yerr=[[sum(v) / len(v) - min(v) for _, v in pts], [max(v) - sum(v) / len(v) for _, v in pts]])
        ax.axhline(report["dense_ppl"], color="grey", ls=":", label="dense")
        ax.set_yscale("log")
        ax.set_title(f"reconstruction: {mode}")
        ax.set_xlabel("parameters removed")
    axes[0].set_ylabel("WikiText-2 perplexity")
    axes[-1].legend(fontsize=7)
    source = report["settings"].get("calib_source", "c4/c4_sample.json")
    fig.suptitle(f"SmolLM2-135M, calibration {source}, mean and range over draws {draws}; {report['date']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)  # the report is redrawn after every cell


@contextmanager
def merged(path: Path, report: dict, resume: bool):
    """Hold a lock on `path` and take into `report` the cells and runs another `--resume` run of this
    script saved there meanwhile, so two runs (one per core) can fill one table."""
    import fcntl
    import json
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if resume and path.exists():
            disk = json.loads(path.read_text())
            mine, theirs = report["cells"], disk.get("cells", {})  # updated in place: run_draw holds `mine`
            for k, v in theirs.items():
                if k == "_cost":
                    mine["_cost"] = {**v, **mine.get("_cost", {})}
                else:
                    mine.setdefault(k, v)
            runs = {(r["command"], r["date"]) for r in report["runs"]}
            report["runs"] = [r for r in disk.get("runs", []) if (r["command"], r["date"]) not in runs] + report["runs"]
            report["runs"].sort(key=lambda r: r["date"])
        yield


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--draws", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--targets", nargs="+", default=["heads", "mlp"])
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-len", type=int, default=128)
    p.add_argument("--refit-samples", type=int, default=0,
                   help="windows the reconstruction refits on (0: the scoring calibration itself)")
    p.add_argument("--refit-target", default=REFIT_TARGETS[0], choices=list(REFIT_TARGETS),
                   help="what the refit matches: the dense residual stream (default) or the dense output")
    p.add_argument("--hywia-after-refit", action="store_true",
                   help="judge HyWIA's candidates after the refit (HyWIA(after_refit=True)) in the refit modes")
    p.add_argument("--refit-precision", default=REFIT_PRECISIONS[0], choices=list(REFIT_PRECISIONS),
                   help="the refit's forward passes in float32 (default) or under bfloat16 autocast (faster)")
    p.add_argument("--calib-source", default="c4/c4_sample.json",
                   help="calibration text under the data dir (a JSON of {text} records or a plain text file)")
    p.add_argument("--c4-eval", type=int, default=0,
                   help="also report perplexity on this many 128-token C4 windows (seed 7)")
    p.add_argument("--eval-tokens", type=int, default=10240)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=str(RESULTS / "reconstruction_table"))
    p.add_argument("--resume", action="store_true", help="keep the cells already in the JSON file")
    args = p.parse_args(argv)
    import json
    import fxprune
    from fxprune.planning.config import protected_layers
    from fxprune.data.loaders import calibration_samples
    from fxprune.evaluation.evaluate import eval_windows
    from fxprune.data.models import load_model
    out = Path(args.out)
    old = json.loads(out.with_suffix(".json").read_text()) if args.resume and out.with_suffix(".json").exists() else {}
    windows_path = data_dir(args.data_dir) / "wikitext-2-raw" / "wiki.test.raw"  # checked before loading
    model, tok = load_model()
    windows = {"wikitext": eval_windows(tok, windows_path, 128, args.eval_tokens)}
    if args.c4_eval:  # text of another domain; held out only when the calibration source is not the C4 sample
        windows["c4"] = calibration_samples(data_dir(args.data_dir) / "c4" / "c4_sample.json", tok, args.c4_eval,
                                            128, seed=7)
    dg = fxprune.analyze(model)
    n_layers = len(dg.attention_ops)
    report = {**header(), "settings": {k: v for k, v in vars(args).items() if k not in ("out", "resume")},
              **{f"dense_{ppl_key(k)}": perplexity(model, w) for k, w in windows.items()},
              "protected": sorted(protected_layers("auto", n_layers)), "cells": old.get("cells", {})}
    earlier = old.get("runs") or ([{k: old.get(k) for k in ("command", "date", "load_average_start")}] if old else [])
    report["runs"] = earlier + [{"command": report["command"], "date": report["date"],
                                             "load_average_start": report["load_average_start"]}]

    def save():
        with merged(out.with_suffix(".json"), report, args.resume):
            write_json(out.with_suffix(".json"), finish(report))
            write_report(report, out)
    for draw in args.draws:
        run_draw(model, tok, dg, windows, draw, args, report["cells"], save)
    save()


if __name__ == "__main__":
    main()
