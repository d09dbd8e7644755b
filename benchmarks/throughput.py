"""Issue 6: forward throughput (tokens/s) of the 20%-pruned SmolLM2-135M-Instruct against the dense one on CPU.

Dense = the Hugging Face model (`use_cache=False`, its default sdpa attention); pruned = the GraphModule
`fxprune.apply` emits (`--importance` l2 by default: the importance decides which units go and only the
top-up of the uniform allocation, so the shapes hardly depend on it; protect_layers (0, 1, 2, -2, -1),
targets heads + mlp, as in issue 4), once per `--round-to` variant (1 = unrounded, 64 = MLP widths in
multiples of 64).
Both eager and `torch.compile` (inductor, default mode, `dynamic=False` unless --dynamic: one graph per
shape, compiled during warm-up). For each batch x sequence the dense and pruned forwards are timed alternately
(`--runs` pairs after `--warmup` calls of each), so load from other jobs hits both alike; the table gives the
median tokens/s of each and the median of the per-pair speedups. Ideal speedups: 1/(1-ratio) (parameter
count) and the ratio of linear-layer weights (dense / pruned, lm_head included, embedding lookup excluded),
which is what the matmul FLOPs scale with (the same here: SmolLM2 ties its embedding to lm_head).

Usage: PYTHONPATH=. python -m benchmarks.throughput [--ratio 0.2] [--runs 9] [--modes eager compile] [--round-to 1 64]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import report_head, RESULTS, Phase, finish, header, log, md_table, write_json, write_outputs


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--importance", default="l2")
    p.add_argument("--round-to", type=int, nargs="+", default=[1, 64],
                   help="pruned variants: fxprune round_to of the MLP widths (1 = unrounded)")
    p.add_argument("--protect", type=int, nargs="*", default=[0, 1, 2, -2, -1])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--seqs", type=int, nargs="+", default=[128, 512])
    p.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile", "aoti"],
                   help="aoti: AOTInductor packages (torch.export with dynamic batch/sequence, compiled ahead of time)")
    p.add_argument("--dynamic", action="store_true",
                   help="torch.compile(dynamic=True): one graph for all shapes (faster to run, kernels less specialised)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs", type=int, default=9)
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


def variant_name(round_to: int) -> str:
    return "unrounded" if round_to <= 1 else f"round_to {round_to}"


def dense_logits_module(model):
    """The Hugging Face model as a module `(input_ids, attention_mask) -> logits`, for torch.export."""
    import torch

    class DenseLogits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids, attention_mask=attention_mask, use_cache=False).logits
    return DenseLogits()


def aoti_runners(model, pruned: dict, max_seq: int, scratch: Path) -> dict:
    """AOTInductor packages of the dense model and every pruned variant (dynamic batch and sequence),
    loaded back as callables `(ids, mask) -> logits`; compiled C++ runs them, not the Python model."""
    import tempfile
    import torch
    from fxprune.export.program import LogitsOnly, logits_program
    example = (torch.randint(1, 1000, (2, 16)), torch.ones(2, 16, dtype=torch.long))
    modules = {"dense": dense_logits_module(model), **{rt: LogitsOnly(gm) for rt, gm in pruned.items()}}
    runners = {}
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        for name, module in modules.items():
            path = str(Path(tmp) / f"{name}.pt2")
            torch._inductor.aoti_compile_and_package(logits_program(module, example, max_seq), package_path=path)
            runners[name] = torch._inductor.aoti_load_package(path)
            log(f"aoti package for {name} compiled")
    return runners


def plot(report: dict, path: Path) -> None:
    """Left: tokens/s of dense and pruned models; right: speedup against the ideal and the 1.15x bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report["rows"]
    shapes = list(dict.fromkeys((r["batch"], r["seq"]) for r in rows))
    series = list(dict.fromkeys((r["mode"], r["variant"]) for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    label = {"eager": "eager", "compile": "torch.compile", "aoti": "AOTInductor"}
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.6))
    xs = range(len(shapes))
    ticks = [f"{b} x {s}" for b, s in shapes]

    def value(mode, variant, shape, key):
        return next((r[key] for r in rows if (r["mode"], r["variant"]) == (mode, variant)
                     and (r["batch"], r["seq"]) == shape), float("nan"))

    for mode in modes:
        v0 = next(v for m, v in series if m == mode)
        ax0.plot(xs, [value(mode, v0, s, "dense_tok_s") for s in shapes], "o--", label=f"dense, {label[mode]}")
    for mode, variant in series:
        ax0.plot(xs, [value(mode, variant, s, "pruned_tok_s") for s in shapes], "s-",
                 label=f"pruned ({variant}), {label[mode]}")
    ax0.set_xticks(list(xs), ticks)
    ax0.set_xlabel("batch x sequence")
    ax0.set_ylabel("tokens / s (median)")
    ax0.set_ylim(bottom=0)
    ax0.set_title("forward throughput")
    ax0.legend(fontsize=7, loc="lower left")
    width = 0.8 / len(series)
    for k, (mode, variant) in enumerate(series):
        vals = [value(mode, variant, s, "speedup_median") for s in shapes]
        pos = [i + (k - (len(series) - 1) / 2) * width for i in xs]
        bars = ax1.bar(pos, vals, width, label=f"{label[mode]}, {variant}")
        for b, v in zip(bars, vals):
            ax1.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax1.axhline(report["ideal_params"], color="k", ls="--", lw=1,
                label=f"ideal 1/(1-ratio) = {report['ideal_params']:.2f}")
    ax1.axhline(1.15, color="g", ls=":", lw=1, label="1.15x (issue 6 bar at 4 x 512)")
    ax1.axhline(1.0, color="r", lw=0.8, label="dense")
    ax1.set_ylim(0.8, max([report["ideal_params"]] + [r["speedup_median"] for r in rows]) * 1.12)
    ax1.set_xticks(list(xs), ticks)
    ax1.set_xlabel("batch x sequence")
    ax1.set_ylabel("pruned / dense tokens per second")
    ax1.set_title("speedup (median of alternating pairs)")
    ax1.legend(fontsize=7, loc="upper left", ncol=2)
    m = report["machine"]
    fig.suptitle(f"SmolLM2-135M-Instruct fp32, {report['settings']['ratio']:.0%} pruned vs dense; {m['cpu']}, "
                 f"{m['torch_threads']} threads, torch {m['torch']}; {report['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(report: dict, png: Path) -> str:
    s = report["settings"]
    pruned = "; ".join(f"{variant_name(rt)}: {v['params']:,} parameters, linear weights {v['linear']:,}, "
                       f"ideal speedups {v['ideal_params']:.3f} (parameters) / {v['ideal_linear']:.3f} (linear weights)"
                       for rt, v in ((int(k), v) for k, v in report["variants"].items()))
    lines = report_head("Pruned vs dense forward throughput (issue 6)", report) + [
             f"SmolLM2-135M-Instruct fp32, {s['ratio']:.0%} of parameters pruned ({s['importance']} importance, "
             f"heads + MLP, protected layers {tuple(s['protect'])}); dense: {report['params_dense']:,} parameters, "
             f"linear weights {report['linear_dense']:,}. Pruned variants: {pruned}. `round_to` is fxprune's "
             "hardware-friendly rounding of each layer's kept MLP width (multiples of 64 keep the matmuls on "
             "the fast GEMM tile sizes); unrounded is LLM-Pruner's per-layer count. Dense = the Hugging Face "
             "model (`use_cache=False`, sdpa); pruned = the GraphModule. Forward pass of the whole batch (no KV "
             f"cache, attention_mask of ones), torch.set_num_threads({report['machine']['torch_threads']}); "
             f"{s['warmup']} warm-up calls of each, then {s['runs']} timed rounds alternating dense and pruned. "
             "The ideal speedup counts parameters (1/(1-ratio)); attention scores, norms and the logits "
             "(49,152-way, unpruned) do not shrink, so the measured speedup stays below it.", ""]
    heads = ["mode", "batch x seq", "pruned variant", "dense tok/s", "pruned tok/s", "speedup (median of pairs)",
             "ideal", ">= 1.15", "dense spread", "pruned spread"]
    rows = []
    for r in report["rows"]:
        ideal = report["variants"][str(r["round_to"])]["ideal_params"]
        rows.append([r["mode"], f"{r['batch']} x {r['seq']}", r["variant"], f"{r['dense_tok_s']:.0f}",
                     f"{r['pruned_tok_s']:.0f}", f"**{r['speedup_median']:.2f}**", f"{ideal:.2f}",
                     "yes" if r["speedup_median"] >= 1.15 else "no",
                     f"{r['dense_spread']:.0%}", f"{r['pruned_spread']:.0%}"])
    lines += [md_table(heads, rows), "",
              "Spread: (max - min) / median of the timed runs, a measure of the noise.", ""]
    if report.get("compile_s"):
        lines += [f"torch.compile(dynamic={s.get('dynamic', False)}) warm-up (first calls per shape, includes "
                  "compilation): " + "; ".join(f"{k}: {v:.0f} s" for k, v in report["compile_s"].items()), ""]
    lines += [f"![throughput and speedup]({png.name})", ""]
    return "\n".join(lines)


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    import torch
    torch.set_num_threads(args.threads)
    import fxprune
    from fxprune.data.models import load_model

    out = Path(args.out)
    report = header(args.threads)
    report["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    model, tok = load_model(args.model)
    with Phase() as p:
        dg = fxprune.analyze(model)
    log(f"captured and analysed in {p.wall_s:.0f} s")
    report.update({"params_dense": dg.num_parameters(), "linear_dense": linear_weights(model), "variants": {}})
    pruned = {}
    for rt in args.round_to:
        with Phase() as p:
            plan = fxprune.plan(model, args.ratio, importance=args.importance, protect_layers=tuple(args.protect),
                                round_to=rt if rt > 1 else None, dg=dg)
            pruned[rt] = fxprune.apply(model, plan, dg=dg)
        lin = linear_weights(pruned[rt])
        report["variants"][str(rt)] = {"params": plan.params_after, "removed_fraction": plan.removed_fraction,
                                       "linear": lin, "ideal_params": 1 / (1 - plan.removed_fraction),
                                       "ideal_linear": report["linear_dense"] / lin, "prune_s": p.wall_s}
        log(f"{variant_name(rt)}: {plan.params_after:,} parameters, pruned in {p.wall_s:.0f} s")
    report["ideal_params"] = max(v["ideal_params"] for v in report["variants"].values())
    report["rows"], report["compile_s"] = [], {}

    def dense_fn(m):
        return lambda ids, mask: m(ids, attention_mask=mask, use_cache=False).logits

    def pruned_fn(m):
        return lambda ids, mask: m(ids, attention_mask=mask).logits

    gen = torch.Generator().manual_seed(0)
    for mode in args.modes:
        torch._dynamo.reset()
        if mode == "aoti":
            with Phase() as p:
                fns = aoti_runners(model, pruned, max(args.seqs), out.parent)
            report["compile_s"]["aoti (ahead of time, all variants)"] = p.wall_s
        else:
            wrap = (lambda m: m) if mode == "eager" else (lambda m: torch.compile(m, dynamic=args.dynamic))
            fns = {"dense": dense_fn(wrap(model)), **{rt: pruned_fn(wrap(gm)) for rt, gm in pruned.items()}}
        for b in args.batches:
            for s in args.seqs:
                ids = torch.randint(0, model.config.vocab_size, (b, s), generator=gen)
                mask = torch.ones_like(ids)
                times = {name: [] for name in fns}
                with torch.inference_mode():
                    for name, fn in fns.items():
                        t = time.perf_counter()
                        for _ in range(args.warmup):
                            fn(ids, mask)
                        if mode == "compile":
                            report["compile_s"][f"{'dense' if name == 'dense' else variant_name(name)} {b}x{s}"] = \
                                time.perf_counter() - t
                    for _ in range(args.runs):
                        for name, fn in fns.items():
                            t = time.perf_counter()
                            fn(ids, mask)
                            times[name].append(time.perf_counter() - t)
                dense = times["dense"]
                for rt in pruned:
                    pr = times[rt]
                    pairs = [d / q for d, q in zip(dense, pr)]
                    row = {"mode": mode, "batch": b, "seq": s, "round_to": rt, "variant": variant_name(rt),
                           "dense_s": dense, "pruned_s": pr,
                           "dense_tok_s": b * s / statistics.median(dense), "pruned_tok_s": b * s / statistics.median(pr),
                           "speedup_median": statistics.median(pairs),
                           "speedup_of_medians": statistics.median(dense) / statistics.median(pr),
                           "dense_spread": (max(dense) - min(dense)) / statistics.median(dense),
                           "pruned_spread": (max(pr) - min(pr)) / statistics.median(pr)}
                    report["rows"].append(row)
                    log(f"{mode} {b}x{s} {row['variant']}: dense {row['dense_tok_s']:.0f} tok/s, pruned "
                        f"{row['pruned_tok_s']:.0f} tok/s, speedup {row['speedup_median']:.3f}")
                write_json(out.with_suffix(".json"), report)
    finish(report)
    return write_outputs(report, out, plot, render)


if __name__ == "__main__":
    main()
