"""The headline call, `fxprune.compile(model, ratio)` with nothing else, on the embedded SmolLM2.

WikiText-2 perplexity on the first 10,240 tokens (128-token windows) of the dense and the pruned model,
parameter counts, the settings the call used, and its wall time and peak memory.

    PYTHONPATH=. FXPRUNE_DATA_DIR=... python -m benchmarks.headline --ratios 0.2 0.5
"""
from __future__ import annotations

import argparse

from benchmarks.common import RESULTS, Phase, data_dir, finish, header, md_table, report_head, write_json


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    p.add_argument("--eval-tokens", type=int, default=10240)
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    import fxprune
    from fxprune.evaluation.evaluate import perplexity
    from fxprune.data.models import load_model
    wiki = data_dir(args.data_dir) / "wikitext-2-raw" / "wiki.test.raw"
    model, tok = load_model()
    report = {**header(), "dense_ppl": perplexity(model, tok, wiki, max_tokens=args.eval_tokens), "rows": []}
    for ratio in args.ratios:
        with Phase() as ph:
            gm = fxprune.compile(model, ratio=ratio)
        plan = gm.meta[fxprune.PLAN_KEY]
        report["rows"].append({"ratio": ratio, "ppl": perplexity(gm, tok, wiki, max_tokens=args.eval_tokens),
                               "params_before": plan.params_before, "params_after": plan.params_after,
                               "config": plan.config.to_dict(), "compile_s": ph.wall_s, "peak_gb": ph.peak_gb})
    finish(report)
    write_json(RESULTS / "headline.json", report)
    rows = [["dense", f"{report['rows'][0]['params_before']:,}", f"{report['dense_ppl']:.2f}", "-", "-"]]
    rows += [[f"`fxprune.compile(model, ratio={r['ratio']})`", f"{r['params_after']:,} "
              f"(-{1 - r['params_after'] / r['params_before']:.2%})", f"{r['ppl']:.2f}", f"{r['compile_s']:.1f} s",
              f"{r['peak_gb']:.2f} GB"] for r in report["rows"]]
    cfg = report["rows"][0]["config"]
    refit = cfg["reconstruct"] if isinstance(cfg["reconstruct"], dict) else {  # results written before Refit
        "mode": cfg["reconstruct"], "target": cfg.get("refit_target", "output"), "samples": cfg["reconstruct_samples"]}
    lines = report_head("The headline call on SmolLM2-135M-Instruct", report)
    lines += [f"WikiText-2 perplexity, first {args.eval_tokens:,} tokens, 128-token windows; no tuning. Settings the "
              f"call used (library defaults): importance {cfg['importance']}, allocation {cfg['allocation']}, "
              f"protect_layers {cfg['protect_layers']}, round_to {cfg['round_to']}, reconstruct {refit['mode']} "
              f"(target {refit['target']}, on {refit['samples']} windows), calibration "
              f"{cfg['calibration_samples']} x {cfg['calibration_len']} tokens of the packaged C4 sample.",
              "", md_table(["model", "parameters", "ppl", "compile time", "peak RSS"], rows), ""]
    (RESULTS / "headline.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
