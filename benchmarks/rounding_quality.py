"""Speed by default, and what it costs (issue 14): `fxprune.compile(model, ratio)` with its default rounding
(`round_to="auto"`: MLP widths of 512+ channels in multiples of 64) next to the same call with `round_to=None`.

Per plan: parameters removed (the exact-ratio contract: within 1% of the ratio), MLP widths, WikiText-2
perplexity on the first 10,240 tokens (128-token windows, as benchmarks/headline.py), and batch-1 eager
decode speed with the KV cache against dense Hugging Face `generate` (prompt 128, 128 new tokens; the timing
code of benchmarks/decode.py, rounds alternating dense and every plan, medians).

    PYTHONPATH=. FXPRUNE_DATA_DIR=... python -m benchmarks.rounding_quality --ratios 0.2 0.5
"""
from __future__ import annotations

import argparse

from benchmarks.common import RESULTS, Phase, data_dir, finish, header, log, md_table, report_head, write_json
from benchmarks.decode import dense_runner, measure, pruned_runner, summarise

SETTINGS = {"default": {}, "round_to=None": {"round_to": None}}  # the keyword passed to fxprune.compile


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    p.add_argument("--eval-tokens", type=int, default=10240)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    import fxprune
    from fxprune.evaluation.evaluate import perplexity
    from fxprune.serving.generation import Generator
    from fxprune.data.models import load_model
    wiki = data_dir(args.data_dir) / "wikitext-2-raw" / "wiki.test.raw"
    model, tok = load_model()
    out = RESULTS / "rounding_quality"
    report = {**header(1), "settings": vars(args), "dense_ppl": perplexity(model, tok, wiki, max_tokens=args.eval_tokens),
              "rows": []}
    log(f"dense ppl {report['dense_ppl']:.2f}")
    runners, length = {"dense": dense_runner(model, "eager")}, args.prompt + args.new
    for ratio in args.ratios:
        for name, kwargs in SETTINGS.items():
            with Phase() as ph:
                gm = fxprune.compile(model, ratio, **kwargs)
            plan = gm.meta[fxprune.PLAN_KEY]
            widths = sorted({t.shape[0] for n, t in gm.named_parameters() if n.endswith("up_proj.weight")})
            row = {"ratio": ratio, "setting": name, "round_to": plan.config.round_to, "params": plan.params_after,
                   "removed_fraction": plan.removed_fraction, "mlp_widths": widths, "compile_s": ph.wall_s,
                   "ppl": perplexity(gm, tok, wiki, max_tokens=args.eval_tokens)}
            report["rows"].append(row)
            runners[f"{ratio:.0%} {name}"] = pruned_runner(Generator(gm, cache_block=length), "eager", 1, length)
            log(f"{ratio} {name}: {row['removed_fraction']:.2%} removed, ppl {row['ppl']:.2f}, widths {widths}")
            write_json(out.with_suffix(".json"), report)
    ids = torch.randint(10, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        for fn in runners.values():
            fn(ids, mask, 2)  # warm-up
        times = measure(runners, ids, mask, args.new, args.runs, "cpu")
    dense = report["dense_decode"] = summarise(times["dense"], 1, args.new)
    for row in report["rows"]:
        row["decode"] = summarise(times[f"{row['ratio']:.0%} {row['setting']}"], 1, args.new)
        row["decode_speedup"] = row["decode"]["decode_tok_s"] / dense["decode_tok_s"]
    finish(report)
    write_json(out.with_suffix(".json"), report)
    (out.with_suffix(".md")).write_text(render(report))


def render(report: dict) -> str:
    s = report["settings"]
    rows = [["dense", "-", "-", "-", f"{report['dense_ppl']:.2f}", f"{report['dense_decode']['decode_tok_s']:.1f}", "-"]]
    for r in report["rows"]:
        off = r["removed_fraction"] - r["ratio"]
        rows.append([f"`compile(model, {r['ratio']}" + (")`" if r["setting"] == "default" else ", round_to=None)`"),
                     f"{r['params']:,} ({r['removed_fraction']:.2%}, {off:+.2%}" + (")" if abs(off) <= 0.01 else ", OUT of 1%)"),
                     ", ".join(map(str, r["mlp_widths"])), f"{r['compile_s']:.0f} s", f"{r['ppl']:.2f}",
                     f"{r['decode']['decode_tok_s']:.1f}", f"**{r['decode_speedup']:.2f}**"])
    lines = report_head("Default rounding (round_to='auto') against the unrounded plan, SmolLM2-135M (issue 14)",
                        report)
    lines += [f"`fxprune.compile` with the library defaults otherwise. Perplexity: WikiText-2, first "
              f"{s['eval_tokens']:,} tokens, 128-token windows, no tuning. Decode: batch 1, eager, prompt {s['prompt']} "
              f"random tokens, {s['new']} new tokens, KV-cache `Generator` against dense Hugging Face `generate` with "
              f"its cache, {s['runs']} alternating rounds, medians. Removed: fraction of parameters removed and its "
              "distance from the ratio (the contract: within 1%).", "",
              md_table(["call", "parameters (removed, vs ratio)", "MLP widths", "compile time", "ppl",
                        "decode tok/s", "decode speedup"], rows), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
