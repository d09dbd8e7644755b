"""Issue 4: WikiText-2 perplexity of the embedded SmolLM2-135M-Instruct pruned with each importance estimator.

Protocol (LLM-Pruner's, no tuning after pruning): calibration = `--calib-samples` windows of `--calib-len`
tokens drawn from c4/c4_sample.json (seed 0); targets heads + MLP; layers 0, 1, 2, -2, -1 protected;
perplexity on 128-token windows of wikitext-2-raw/wiki.test.raw, first `--eval-tokens` tokens.

The model is analysed once and the analysis reused. The Taylor estimators (vector, element1, element2,
hywia) share one gradient pass (`fxprune.scoring.compute_gradients`, per-sample, with the squared
gradients element2 needs): it gives exactly the G (and Fisher diagonal) each estimator would compute on
its own with `fxprune.plan`'s defaults (batch_size 1), so the scores are those `fxprune.plan` would make.
Scores are then passed to `fxprune.plan(..., scores=...)`. HyWIA depends on the ratio, so it is scored
once per ratio. Wall time and peak RSS (ru_maxrss, reset per phase through /proc/self/clear_refs) are
recorded for the gradient pass and for each estimator's scoring given those gradients.

Usage (from the repository root, FXPRUNE_DATA_DIR set or --data-dir given):
    PYTHONPATH=. python -m benchmarks.importance_table
    PYTHONPATH=. python -m benchmarks.importance_table --ratios 0.1 0.2 0.3 0.4 0.5 --eval-tokens 10240 \
        --out benchmarks/results/importance_sweep
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from benchmarks.common import (report_head, RESULTS, Phase, data_dir, finish, header, log, md_table,
                               shared_note, write_json)

METHODS = ("random", "l2", "vector", "element1", "element2", "hywia")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--eval-tokens", type=int, default=20480)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    p.add_argument("--protect", type=int, nargs="*", default=[0, 1, 2, -2, -1])
    p.add_argument("--targets", nargs="+", default=["heads", "mlp"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hywia-steps", type=int, default=None,
                   help="smoke tests only; default: the library default (30)")
    p.add_argument("--data-dir", default=None, help="default: $FXPRUNE_DATA_DIR")
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--out", default=str(RESULTS / "importance_table"),
                   help="output path without extension (.json, .md and .png are written)")
    p.add_argument("--render", action="store_true", help="only rewrite .md and .png from the existing --out .json")
    return p.parse_args(argv)


def fmt_ppl(x):
    return "–" if x is None else (f"{x:.2f}" if x < 1e4 else f"{x:.3g}")


def validation_cells(v: dict) -> list:
    if not v:
        return ["–", "–", "learned"]
    return [f"{v['learned']:.4f}", f"{v['fine']:.4f}", "fine only" if v["fine"] < v["learned"] else "learned"]


def render(report: dict) -> str:
    ratios = report["settings"]["ratios"]
    methods = report["settings"]["methods"]
    ppl = {(r["method"], r["ratio"]): r["ppl"] for r in report["rows"]}
    s = report["settings"]
    lines = report_head(f"Importance estimators on {report['model']['name']} (issue 4)", report) + [
             f"WikiText-2 test perplexity, {s['window']}-token windows over the first {s['eval_tokens']:,} tokens "
             f"({report['eval_windows']} windows), no tuning after pruning. Calibration: {s['calib_samples']} x "
             f"{s['calib_len']} tokens from c4/c4_sample.json (seed {s['seed']}). Targets "
             f"{' + '.join(s['targets'])}, protected layers {tuple(s['protect'])}, allocation uniform (fxprune "
             f"default). Parameters: {report['model']['parameters']:,} dense.", "",
             f"Dense model: **{fmt_ppl(report['dense']['ppl'])}**", ""]
    heads = ["importance"] + [f"ratio {r:g}: ppl" for r in ratios] + [f"ratio {r:g}: removed" for r in ratios]
    rows = []
    by = {(r["method"], r["ratio"]): r for r in report["rows"]}
    for m in methods:
        cells = [m] + [fmt_ppl(ppl.get((m, r))) for r in ratios]
        cells += [f"{by[(m, r)]['removed_fraction']:.3f}" if (m, r) in by else "–" for r in ratios]
        rows.append(cells)
    lines += [md_table(heads, rows), ""]
    if "hywia" in methods and "element1" in methods:
        lines += ["HyWIA against element1 (lower perplexity is better):", ""]
        cmp_rows = []
        for r in ratios:
            h, e = ppl.get(("hywia", r)), ppl.get(("element1", r))
            if h is None or e is None:
                continue
            verdict = "HyWIA better" if h < e else ("tie" if h == e else "element1 better")
            cmp_rows.append([f"{r:g}", fmt_ppl(e), fmt_ppl(h), f"{h - e:+.2f}", f"{100 * (h - e) / e:+.1f}%", verdict])
        lines += [md_table(["ratio", "element1", "hywia", "hywia - element1", "relative", "verdict"], cmp_rows), ""]
    sc = report["scoring"]
    lines += ["Scoring cost (wall time and peak RSS of each phase; the peak counts what was already resident: "
              "model, analysis and, for the Taylor estimators, the shared gradients):", ""]
    srows = []
    g = sc.get("gradients")
    if g:
        srows.append(["gradient pass (shared by vector, element1, element2, hywia)", "–", f"{g['wall_s']:.1f}",
                      f"{g['peak_rss_gb']:.2f}", f"{g['peak_increase_gb']:+.2f}"])
    for e in sc["estimators"]:
        srows.append([e["method"], "all" if e["ratio"] is None else f"{e['ratio']:g}", f"{e['wall_s']:.1f}",
                      f"{e['peak_rss_gb']:.2f}", f"{e['peak_increase_gb']:+.2f}"])
    lines += [md_table(["phase", "ratio", "wall s", "peak RSS GB", "peak over RSS before"], srows), ""]
    if g:
        lines += [f"A Taylor estimator used alone costs the gradient pass plus its own line: e.g. element1 alone "
                  f"≈ {g['wall_s']:.0f} s + its estimate time. element2 needs the per-sample squared gradients "
                  f"the shared pass computes; the others need only G, which fxprune computes with the same "
                  f"per-sample passes at its default batch_size 1.", ""]
    if sc.get("hywia_diagnostics"):
        lines += ["HyWIA diagnostics (LM loss of the masked model at the first and last of its steps, one "
                  "calibration sample each; validation: mean LM loss over all calibration samples of the model "
                  "pruned by the learned blend and by the fine-only corner, the lower one is returned; weight of "
                  "the fine granularity, element1, over the masked groups of the returned scores):", ""]
        lines += [md_table(["ratio", "steps", "loss first", "loss last", "validation: learned", "fine only",
                            "returned", "mean alpha_fine", "min", "max"],
                           [[f"{d['ratio']:g}", d["steps"], f"{d['loss_first']:.4f}", f"{d['loss_last']:.4f}",
                             *validation_cells(d.get("validation") or {}),
                             f"{d['alpha_fine_mean']:.3f}", f"{d['alpha_fine_min']:.3f}", f"{d['alpha_fine_max']:.3f}"]
                            for d in sc["hywia_diagnostics"]]), ""]
    ov = report["overhead"]
    lines += [f"Other phases: model load {ov['load']['wall_s']:.0f} s, analysis (capture + dependency "
              f"propagation, once) {ov['analysis']['wall_s']:.1f} s (peak RSS {ov['analysis']['peak_rss_gb']:.2f} GB); "
              f"per row plan {report['plan_apply_s']['plan_mean']:.2f} s and apply (rewrite) "
              f"{report['plan_apply_s']['apply_mean']:.2f} s on average; one perplexity evaluation "
              f"{report['eval_s_mean']:.0f} s on average. Total {report['total_s'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Perplexity against the removed fraction, one line per estimator, the dense model as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for m in report["settings"]["methods"]:
        pts = sorted((r["removed_fraction"], r["ppl"]) for r in report["rows"] if r["method"] == m)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=m)
    ax.axhline(report["dense"]["ppl"], color="k", ls="--", lw=1, label=f"dense {report['dense']['ppl']:.1f}")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of parameters removed")
    ax.set_ylabel(f"WikiText-2 perplexity ({report['settings']['window']}-token windows)")
    ax.set_title(f"SmolLM2-135M-Instruct, no tuning, first {report['settings']['eval_tokens']:,} tokens", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(report: dict, out: Path) -> None:
    plot(report, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(render(report) + f"![perplexity against ratio]({out.name}.png)\n")


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.render:
        out = Path(args.out)
        report = json.loads(out.with_suffix(".json").read_text())
        write_outputs(report, out)
        return report
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        raise SystemExit(f"unknown methods {bad}; choose from {METHODS}")
    import torch
    torch.set_num_threads(args.threads)
    import fxprune
    from fxprune.planning.config import PruneConfig
    from fxprune.data.loaders import calibration_samples
    from fxprune.evaluation.evaluate import eval_windows, perplexity
    from fxprune.data.models import load_model
    from fxprune.planning.plan import target_groups
    from fxprune.scoring import ESTIMATORS, compute_gradients, hywia, score
    from fxprune.scoring.gradients import member_names as _member_names

    t_start = time.perf_counter()
    root = data_dir(args.data_dir)
    wiki = root / "wikitext-2-raw" / "wiki.test.raw"
    out = Path(args.out)
    report = header(args.threads)
    report["settings"] = {k: v for k, v in vars(args).items() if k not in ("data_dir", "out")}
    report["rows"] = []

    with Phase() as p_load:
        model, tok = load_model(args.model)
    log(f"loaded in {p_load.wall_s:.0f} s")
    with Phase() as p_an:
        dg = fxprune.analyze(model)
    log(f"analysed in {p_an.wall_s:.0f} s")
    report["model"] = {"name": args.model or "SmolLM2-135M-Instruct (embedded GGUF, dequantized to fp32)",
                       "parameters": dg.num_parameters(), "layers": model.config.num_hidden_layers,
                       "heads": model.config.num_attention_heads, "kv_heads": model.config.num_key_value_heads}
    report["overhead"] = {"load": p_load.as_dict(), "analysis": p_an.as_dict()}
    calib = calibration_samples(root / "c4" / "c4_sample.json", tok, n_samples=args.calib_samples,
                                seq_len=args.calib_len, seed=args.seed)
    report["eval_windows"] = int(eval_windows(tok, wiki, args.window, args.eval_tokens).shape[0])
    evals = []

    def ppl_of(m):
        t = time.perf_counter()
        value = perplexity(m, tok, wiki, window=args.window, max_tokens=args.eval_tokens, batch_size=args.eval_batch)
        evals.append(time.perf_counter() - t)
        return value

    dense = ppl_of(model)
    report["dense"] = {"ppl": dense, "eval_s": round(evals[-1], 1)}
    log(f"dense ppl {dense:.3f} ({evals[-1]:.0f} s)")
    write_json(out.with_suffix(".json"), report)

    protect = tuple(args.protect)
    cfgs = {r: PruneConfig(ratio=r, importance="l2", targets=tuple(args.targets), protect_layers=protect)
            for r in args.ratios}
    groups = {r: target_groups(dg, cfgs[r]) for r in args.ratios}
    ids = {r: [g.id for g in gs] for r, gs in groups.items()}
    if len({tuple(v) for v in ids.values()}) != 1:
        raise SystemExit("target groups differ between ratios; the shared scores assume they do not")
    gs = groups[args.ratios[0]]
    seed, aggregation = cfgs[args.ratios[0]].seed, cfgs[args.ratios[0]].aggregation

    # -- scoring -----------------------------------------------------------------------------------
    taylor = [m for m in args.methods if m == "hywia" or getattr(ESTIMATORS.get(m), "needs", None)]
    second = any("sq_grad" in getattr(ESTIMATORS.get(m), "needs", ()) for m in args.methods)
    grads, scoring = None, {"estimators": [], "hywia_diagnostics": []}
    scores = {}
    for m in args.methods:
        if m in taylor and grads is None:
            with Phase() as p:
                grads = compute_gradients(dg, calib, _member_names(dg, gs), second_order=second)
            scoring["gradients"] = {**p.as_dict(), "second_order": second, "samples": grads.n_samples,
                                    "calibration_loss": grads.loss}
            log(f"gradient pass {p.wall_s:.0f} s, peak {p.peak_gb:.2f} GB, calibration loss {grads.loss:.4f}")
        if m == "hywia":
            for r in args.ratios:
                kw = {} if args.hywia_steps is None else {"steps": args.hywia_steps}
                with Phase() as p:
                    res = hywia(dg, gs, calib, ratio=r, aggregation=aggregation, seed=seed, gradients=grads, **kw)
                scores[(m, r)] = res.scores
                scoring["estimators"].append({"method": m, "ratio": r, **p.as_dict()})
                alphas = torch.stack([a[0] for gid, a in res.alpha.items()
                                      if dg.groups[gid].kind in ("heads", "kv_groups", "group_heads", "mlp")])
                scoring["hywia_diagnostics"].append({
                    "ratio": r, "steps": len(res.losses), "loss_first": res.losses[0] if res.losses else math.nan,
                    "loss_last": res.losses[-1] if res.losses else math.nan, "losses": res.losses,
                    "alpha_fine_mean": float(alphas.mean()), "alpha_fine_min": float(alphas.min()),
                    "alpha_fine_max": float(alphas.max()), "validation": res.validation})
                log(f"hywia@{r} scored in {p.wall_s:.0f} s")
        else:
            with Phase() as p:
                s = score(dg, gs, method=m, calibration=calib, aggregation=aggregation, seed=seed, gradients=grads)
            for r in args.ratios:
                scores[(m, r)] = s
            scoring["estimators"].append({"method": m, "ratio": None, **p.as_dict()})
            log(f"{m} scored in {p.wall_s:.1f} s")
    report["scoring"] = scoring
    del grads

    # -- plan, apply, evaluate -------------------------------------------------------------------------
    plan_s, apply_s = [], []
    for m in args.methods:
        for r in args.ratios:
            with Phase() as p_plan:
                plan = fxprune.plan(model, r, importance=m, calibration=calib, dg=dg, protect_layers=protect,
                                    targets=tuple(args.targets), scores=scores[(m, r)])
            with Phase() as p_apply:
                gm = fxprune.apply(model, plan, dg=dg)
            plan_s.append(p_plan.wall_s)
            apply_s.append(p_apply.wall_s)
            value = ppl_of(gm)
            report["rows"].append({"method": m, "ratio": r, "ppl": value, "params_after": plan.params_after,
                                   "removed_fraction": round(plan.removed_fraction, 4),
                                   "plan_s": round(p_plan.wall_s, 2), "apply_s": round(p_apply.wall_s, 2),
                                   "apply_peak_rss_gb": round(p_apply.peak_gb, 3), "eval_s": round(evals[-1], 1)})
            log(f"{m}@{r}: ppl {value:.3f}, removed {plan.removed_fraction:.4f} ({evals[-1]:.0f} s eval)")
            del gm, plan
            write_json(out.with_suffix(".json"), report)
    report["plan_apply_s"] = {"plan_mean": sum(plan_s) / len(plan_s), "apply_mean": sum(apply_s) / len(apply_s)}
    report["eval_s_mean"] = sum(evals) / len(evals)
    report["total_s"] = time.perf_counter() - t_start
    finish(report)
    write_json(out.with_suffix(".json"), report)
    write_outputs(report, out)
    log(f"wrote {out}.json, .md and .png")
    return report


if __name__ == "__main__":
    main()
