"""Issue 6: forward throughput (tokens/s) of the 20%-pruned SmolLM2-135M-Instruct against the dense one on CPU.

Dense = the Hugging Face model (`use_cache=False`, its default sdpa attention); pruned = the GraphModule
`fxprune.apply` emits (`--importance` l2 by default: the importance decides which units go, not how many,
so it does not change the shapes; protect_layers (0, 1, 2, -2, -1), targets heads + mlp, as in issue 4).
Both eager and `torch.compile` (inductor, default mode, `dynamic=False` unless --dynamic: one graph per
shape, compiled during warm-up). For each batch x sequence the dense and pruned forwards are timed alternately
(`--runs` pairs after `--warmup` calls of each), so load from other jobs hits both alike; the table gives the
median tokens/s of each and the median of the per-pair speedups. Ideal speedups: 1/(1-ratio) (parameter
count) and the ratio of linear-layer weights (dense / pruned, lm_head included, embedding lookup excluded),
which is what the matmul FLOPs scale with (the same here: SmolLM2 ties its embedding to lm_head).

Usage: PYTHONPATH=. python -m benchmarks.throughput [--ratio 0.2] [--runs 7] [--modes eager compile]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS, Phase, finish, header, log, machine_line, md_table, shared_note, write_json


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--importance", default="l2")
    p.add_argument("--protect", type=int, nargs="*", default=[0, 1, 2, -2, -1])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--seqs", type=int, nargs="+", default=[128, 512])
    p.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    p.add_argument("--dynamic", action="store_true",
                   help="torch.compile(dynamic=True): one graph for all shapes (faster to run, kernels less specialised)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=None)
    p.add_argument("--out", default=str(RESULTS / "throughput"), help="output path without extension")
    return p.parse_args(argv)


def linear_weights(module) -> int:
    import torch
    seen, total = set(), 0
    for m in module.modules():
        if isinstance(m, torch.nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            total += m.weight.numel()
    return total


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report["rows"]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    shapes = list(dict.fromkeys((r["batch"], r["seq"]) for r in rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(modes)
    for k, mode in enumerate(modes):
        vals = [next((r["speedup_median"] for r in rows if r["mode"] == mode and (r["batch"], r["seq"]) == s), 0)
                for s in shapes]
        xs = [i + (k - (len(modes) - 1) / 2) * width for i in range(len(shapes))]
        bars = ax.bar(xs, vals, width, label=mode if mode == "eager" else "torch.compile (inductor)")
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(report["ideal_params"], color="k", ls="--", lw=1, label=f"ideal 1/(1-ratio) = {report['ideal_params']:.2f}")
    ax.axhline(1.0, color="r", lw=0.8, label="dense")
    top = max([report["ideal_params"]] + [r["speedup_median"] for r in rows])
    ax.set_ylim(0, top * 1.15)
    ax.set_xticks(range(len(shapes)), [f"{b} x {s}" for b, s in shapes])
    ax.set_xlabel("batch x sequence")
    ax.set_ylabel("pruned / dense tokens per second")
    ax.set_title(f"SmolLM2-135M, {report['settings']['ratio']:.0%} pruned vs dense, CPU, "
                 f"{report['machine']['torch_threads']} threads")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(report: dict, png: Path) -> str:
    s = report["settings"]
    lines = [f"# Pruned vs dense forward throughput (issue 6)", "",
             f"Machine: {machine_line(report)}.", "", f"Command: `{report['command']}`", "",
             shared_note(report), "",
             f"SmolLM2-135M-Instruct fp32, {s['ratio']:.0%} of parameters pruned ({s['importance']} importance, heads + "
             f"MLP, protected layers {tuple(s['protect'])}): {report['params_dense']:,} -> {report['params_pruned']:,} "
             f"parameters; linear-layer weights {report['linear_dense']:,} -> {report['linear_pruned']:,}. "
             f"Forward pass of the whole batch (no KV cache, attention_mask of ones), torch.set_num_threads("
             f"{report['machine']['torch_threads']}); {s['warmup']} warm-up calls, then {s['runs']} timed dense/pruned "
             f"pairs, alternating. Ideal speedup: 1/(1-ratio) = {report['ideal_params']:.3f}; the ratio of "
             f"linear-layer weights (what the matmul FLOPs scale with; the tied embedding counts as lm_head) is "
             f"{report['ideal_linear']:.3f}. Attention score FLOPs (QK^T, AV) scale with the query heads kept.", ""]
    heads = ["mode", "batch x seq", "dense tok/s", "pruned tok/s", "speedup (median of pairs)", "ideal 1/(1-r)",
             "dense spread", "pruned spread"]
    rows = []
    for r in report["rows"]:
        rows.append([r["mode"], f"{r['batch']} x {r['seq']}", f"{r['dense_tok_s']:.0f}", f"{r['pruned_tok_s']:.0f}",
                     f"**{r['speedup_median']:.2f}**", f"{report['ideal_params']:.2f}",
                     f"{r['dense_spread']:.0%}", f"{r['pruned_spread']:.0%}"])
    lines += [md_table(heads, rows), "",
              "Spread: (max - min) / median of the timed runs, a measure of the noise.", ""]
    if report.get("compile_s"):
        lines += [f"torch.compile(dynamic={s.get('dynamic', False)}) warm-up (first call per shape, includes compilation): " + "; ".join(
            f"{k}: {v:.0f} s" for k, v in report["compile_s"].items()), ""]
    lines += [f"![speedup]({png.name})", ""]
    return "\n".join(lines)


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    import torch
    torch.set_num_threads(args.threads)
    import fxprune
    from fxprune.models import load_model

    out = Path(args.out)
    report = header(args.threads)
    report["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    model, tok = load_model(args.model)
    with Phase() as p:
        gm = fxprune.compile(model, args.ratio, importance=args.importance, protect_layers=tuple(args.protect))
    log(f"pruned in {p.wall_s:.0f} s")
    plan = gm.meta[fxprune.PLAN_KEY]
    report.update({"params_dense": plan.params_before, "params_pruned": plan.params_after,
                   "removed_fraction": plan.removed_fraction, "linear_dense": linear_weights(model),
                   "linear_pruned": linear_weights(gm)})
    report["ideal_params"] = 1 / (1 - plan.removed_fraction)
    report["ideal_linear"] = report["linear_dense"] / report["linear_pruned"]
    report["rows"], report["compile_s"] = [], {}

    def dense_fn(m):
        return lambda ids, mask: m(ids, attention_mask=mask, use_cache=False).logits

    def pruned_fn(m):
        return lambda ids, mask: m(ids, attention_mask=mask).logits

    gen = torch.Generator().manual_seed(0)
    for mode in args.modes:
        if mode == "eager":
            fns = {"dense": dense_fn(model), "pruned": pruned_fn(gm)}
        else:
            torch._dynamo.reset()
            fns = {"dense": dense_fn(torch.compile(model, dynamic=args.dynamic)),
                   "pruned": pruned_fn(torch.compile(gm, dynamic=args.dynamic))}
        for b in args.batches:
            for s in args.seqs:
                ids = torch.randint(0, model.config.vocab_size, (b, s), generator=gen)
                mask = torch.ones_like(ids)
                times = {"dense": [], "pruned": []}
                with torch.inference_mode():
                    for name, fn in fns.items():
                        t = time.perf_counter()
                        for _ in range(args.warmup):
                            fn(ids, mask)
                        if mode == "compile":
                            report["compile_s"][f"{name} {b}x{s}"] = time.perf_counter() - t
                    for _ in range(args.runs):
                        for name, fn in fns.items():
                            t = time.perf_counter()
                            fn(ids, mask)
                            times[name].append(time.perf_counter() - t)
                med = {k: statistics.median(v) for k, v in times.items()}
                pairs = [d / p_ for d, p_ in zip(times["dense"], times["pruned"])]
                row = {"mode": mode, "batch": b, "seq": s, "dense_s": times["dense"], "pruned_s": times["pruned"],
                       "dense_tok_s": b * s / med["dense"], "pruned_tok_s": b * s / med["pruned"],
                       "speedup_median": statistics.median(pairs), "speedup_of_medians": med["dense"] / med["pruned"],
                       "dense_spread": (max(times["dense"]) - min(times["dense"])) / med["dense"],
                       "pruned_spread": (max(times["pruned"]) - min(times["pruned"])) / med["pruned"]}
                report["rows"].append(row)
                log(f"{mode} {b}x{s}: dense {row['dense_tok_s']:.0f} tok/s, pruned {row['pruned_tok_s']:.0f} tok/s, "
                    f"speedup {row['speedup_median']:.3f}")
                write_json(out.with_suffix(".json"), report)
    finish(report)
    write_json(out.with_suffix(".json"), report)
    png = out.with_suffix(".png")
    plot(report, png)
    out.with_suffix(".md").write_text(render(report, png))
    log(f"wrote {out}.json, .md and .png")
    return report


if __name__ == "__main__":
    main()
