"""Issue 14: generation speed (KV cache) of the pruned SmolLM2-135M-Instruct against the dense one.

Dense = Hugging Face `model.generate` with its own cache (DynamicCache in eager; for torch.compile its static
cache, `cache_implementation="static"`, with the forward compiled, the setting transformers documents for
compiled generation). Pruned = `fxprune.serving.generation.Generator` (one captured KV-cache program for prefill and
decode), eager or with its program compiled. Greedy, exactly `--new` tokens (EOS ignored), prompt of `--prompt`
random tokens. Time to first token = generation of 1 token (prefill + one pick); decode tokens/s =
batch x (new - 1) / (time of `new` tokens - time to first token). Every variant at each batch size is timed
in alternating rounds (dense, pruned a, pruned b, ...), so load from other jobs hits all alike; medians.
Pruned variants: each ratio, with `round_to=64` passed explicitly (MLP widths in multiples of 64) and unrounded.
`--device cuda --dtype bfloat16` runs the same on a GPU (the model is pruned on the CPU, then moved).

`--load DIR ...` times saved models (`fxprune.save`) instead of pruning here, e.g. the default plans
(`fxprune.compile(model, ratio)`); `--prefill 4 512` adds a forward of that batch x sequence (no cache: the
GraphModule against the Hugging Face model) and `--cold-start` the first and a later `fxprune.generate` call
from a fresh process state (capture and program build included).

Usage: PYTHONPATH=. python -m benchmarks.decode [--ratios 0.2 0.5] [--batches 1 8] [--modes eager compile]
The issue-31 goal table in one command (two threads, the default plans saved beforehand):
  PYTHONPATH=. python -m benchmarks.decode --load DIR20 DIR50 --skip-dense-program --prefill 4 512 --cold-start
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS, Phase, finish, header, log, md_table, report_head, write_json
from benchmarks.common import write_outputs as common_outputs


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    p.add_argument("--round-to", type=int, nargs="+", default=[64],
                   help="1 = unrounded (benchmarks/rounding_quality.py compares the two at the default importance)")
    p.add_argument("--importance", default="l2")
    p.add_argument("--protect", type=int, nargs="*", default=[0, 1, 2, -2, -1])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--load", nargs="+", default=[], help="saved pruned models to time instead of pruning here")
    p.add_argument("--skip-dense-program", action="store_true",
                   help="leave out the dense model through fxprune's program (its analysis is the slow part)")
    p.add_argument("--prefill", type=int, nargs=2, metavar=("BATCH", "SEQ"), default=None,
                   help="also time a forward of BATCH x SEQ tokens, pruned GraphModule against the dense model")
    p.add_argument("--cold-start", action="store_true",
                   help="also time the first fxprune.generate call (capture, analysis, program) and a later one")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--model", default=None)
    p.add_argument("--out", default=str(RESULTS / "decode"), help="output path without extension")
    p.add_argument("--render-only", action="store_true", help="rewrite .md and .png from the .json (a partial run too)")
    p.add_argument("--note", action="append", default=[], help="with --render-only: a sentence to add under the table")
    p.add_argument("--append", action="store_true",
                   help="keep the rows of the existing .json for the modes/batches this run does not measure "
                        "(e.g. eager first, compile in a second run)")
    return p.parse_args(argv)


def variant_name(ratio, round_to) -> str:
    return f"{ratio:.0%} " + ("unrounded" if round_to <= 1 else f"round_to {round_to}")


def sync(device):
    import torch
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def dense_runner(model, mode):
    """generate(ids, mask, n) with Hugging Face's cache; compiled: static cache and a compiled forward."""
    import torch
    model.generation_config.eos_token_id = None  # exactly n tokens
    kwargs = {}
    if mode == "compile":
        model.forward = torch.compile(model.forward)
        kwargs = {"cache_implementation": "static"}

    def run(ids, mask, n):
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0, **kwargs)
    return run


def pruned_runner(gen, mode, batch, length):
    program = gen.program(batch, length)
    if mode == "compile":
        import torch
        program.step = torch.compile(program.step, dynamic=True)

    def run(ids, mask, n):
        return gen.generate(ids, mask, max_new_tokens=n)
    return run


def time_call(fn, device, *args):
    sync(device)
    t = time.perf_counter()
    fn(*args)
    sync(device)
    return time.perf_counter() - t


def measure(runners, ids, mask, new, runs, device):
    """Per runner: lists of time-to-first-token and full-generation times, alternating runners each round."""
    times = {name: {"ttft": [], "total": []} for name in runners}
    for _ in range(runs):
        for name, fn in runners.items():
            times[name]["ttft"].append(time_call(fn, device, ids, mask, 1))
            times[name]["total"].append(time_call(fn, device, ids, mask, new))
    return times


def summarise(t, batch, new):
    ttft, total = statistics.median(t["ttft"]), statistics.median(t["total"])
    return {"ttft_s": ttft, "total_s": total, "gen_tok_s": batch * new / total,
            "decode_tok_s": batch * (new - 1) / max(total - ttft, 1e-9), "ttft_all": t["ttft"], "total_all": t["total"]}


DENSE_PROGRAM = "0% (dense, fxprune program)"


def prune_variants(model, args, report):
    """The pruned GraphModules by name, after the dense model through fxprune's own program (a plan that
    removes nothing): the baseline that separates the pruning's speedup from the program's."""
    import fxprune
    from fxprune.planning.plan import PrunePlan
    report["params_dense"] = sum(p.numel() for p in model.parameters())
    out = {}
    if not args.skip_dense_program or not args.load:
        dg = fxprune.analyze(model)
        out[DENSE_PROGRAM] = fxprune.apply(model, PrunePlan.keep_all(dg), dg=dg)
        report["variants"][DENSE_PROGRAM] = {"ratio": 0.0, "params": dg.num_parameters(), "removed_fraction": 0.0}
    if args.load:
        return {**out, **load_variants(args.load, report)}
    for ratio in args.ratios:
        for rt in args.round_to:
            with Phase() as p:
                plan = fxprune.plan(model, ratio, importance=args.importance, protect_layers=tuple(args.protect),
                                    round_to=rt if rt > 1 else None, dg=dg)
                gm = fxprune.apply(model, plan, dg=dg)
            name = variant_name(ratio, rt)
            out[name] = gm
            widths = sorted({t.shape[0] for n, t in gm.named_parameters() if n.endswith("up_proj.weight")})
            report["variants"][name] = {"ratio": ratio, "round_to": rt, "params": plan.params_after,
                                        "removed_fraction": plan.removed_fraction, "prune_s": p.wall_s,
                                        "mlp_widths": widths}
            log(f"{name}: {plan.params_after:,} parameters ({plan.removed_fraction:.2%} removed), {p.wall_s:.0f} s")
    return out


def load_variants(directories, report) -> dict:
    """Saved pruned models by name ('20% p20': the fraction removed and the directory)."""
    import fxprune
    from fxprune.api import PLAN_KEY
    out = {}
    for d in directories:
        gm = fxprune.load(d)
        plan = gm.meta[PLAN_KEY]
        name = f"{plan.removed_fraction:.0%} {Path(d).name}"
        out[name] = gm
        widths = sorted({t.shape[0] for n, t in gm.named_parameters() if n.endswith("up_proj.weight")})
        report["variants"][name] = {"directory": str(d), "params": plan.params_after,
                                    "removed_fraction": plan.removed_fraction, "mlp_widths": widths}
    return out


def run_prefill(model, pruned, args, mode, report):
    """Forward of --prefill batch x seq tokens without a cache, dense and each pruned GraphModule alternately."""
    import torch
    batch, seq = args.prefill
    ids = torch.randint(10, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seq))
    mask = torch.ones_like(ids)
    forwards = {"dense": lambda: model(ids, attention_mask=mask, use_cache=False).logits}
    forwards.update({name: (lambda gm=gm: gm(ids, attention_mask=mask).logits) for name, gm in pruned.items()})
    if mode == "compile":
        forwards = {name: torch.compile(fn) for name, fn in forwards.items()}
    with torch.inference_mode():
        for fn in forwards.values():  # warm-up (compilation)
            fn()
        times = {name: [] for name in forwards}
        for _ in range(args.runs):
            for name, fn in forwards.items():
                times[name].append(time_call(lambda *_: fn(), args.device))
    dense = statistics.median(times["dense"])
    for name in pruned:
        row = {"mode": mode, "batch": batch, "seq": seq, "variant": name, "dense_tok_s": batch * seq / dense,
               "pruned_tok_s": batch * seq / statistics.median(times[name]), "times": times[name],
               "dense_times": times["dense"]}
        row["speedup"] = row["pruned_tok_s"] / row["dense_tok_s"]
        report["prefill"].append(row)
        log(f"prefill {mode} {batch}x{seq} {name}: {row['speedup']:.2f}x")


def run_cold_start(pruned, args, report):
    """First `fxprune.generate` call with no capture kept and an empty program store (capture, analysis, rewrite,
    32 tokens), a later call of 8 tokens on the same GraphModule, and a first call with nothing kept in memory
    but the program stored (as in a new process). The process has imported torch and transformers already."""
    import os
    import tempfile
    import torch
    import fxprune
    from fxprune.serving import generation, program_store
    ids = torch.randint(10, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    previous = os.environ.get(program_store.ENV)
    with tempfile.TemporaryDirectory(prefix="fxprune-cold-") as folder:
        os.environ[program_store.ENV] = folder  # an empty store: nothing from earlier runs
        try:
            for name, gm in pruned.items():
                if name == DENSE_PROGRAM:
                    continue
                generation._CAPTURES.clear()
                generation._BY_MODULE.clear()
                first = time_call(lambda: fxprune.generate(gm, ids, max_new_tokens=32), args.device)
                later = time_call(lambda: fxprune.generate(gm, ids, max_new_tokens=8), args.device)
                generation._CAPTURES.clear()
                generation._BY_MODULE.clear()
                stored = time_call(lambda: fxprune.generate(gm, ids, max_new_tokens=32), args.device)
                report["cold_start"][name] = {"first_call_32_tokens_s": first, "later_call_8_tokens_s": later,
                                              "stored_first_call_32_tokens_s": stored}
                log(f"cold start {name}: first call {first:.1f} s, later call {later:.2f} s, "
                    f"first call with the program stored {stored:.2f} s")
        finally:
            if previous is None:
                os.environ.pop(program_store.ENV, None)
            else:
                os.environ[program_store.ENV] = previous


def run_batch(model, generators, args, mode, batch, report):
    import torch
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(10, model.config.vocab_size, (batch, args.prompt), generator=g).to(args.device)
    mask = torch.ones_like(ids)
    length = args.prompt + args.new
    runners = {"dense": dense_runner(model, mode)}
    with Phase() as p:
        for name, gen in generators.items():
            runners[name] = pruned_runner(gen, mode, batch, length)
        # Warm-up with both lengths timed: compiled code is specialised per shape (HF's static cache is as
        # long as prompt + n), so neither the first-token nor the full run may include a compilation.
        for fn in runners.values():
            for n in ((1, args.new) if mode == "compile" else (2,)):
                fn(ids, mask, n)
    report["setup_s"][f"{mode} batch {batch}"] = p.wall_s
    times = measure(runners, ids, mask, args.new, args.runs, args.device)
    dense = summarise(times["dense"], batch, args.new)
    program = summarise(times[DENSE_PROGRAM], batch, args.new) if DENSE_PROGRAM in times else None
    for name in generators:
        row = {"mode": mode, "batch": batch, "variant": name, "dense": dense,
               "pruned": summarise(times[name], batch, args.new)}
        row["decode_speedup"] = row["pruned"]["decode_tok_s"] / dense["decode_tok_s"]
        row["ttft_speedup"] = dense["ttft_s"] / row["pruned"]["ttft_s"]
        if program and name != DENSE_PROGRAM:
            row["program_decode_speedup"] = row["pruned"]["decode_tok_s"] / program["decode_tok_s"]
        report["rows"].append(row)
        log(f"{mode} b{batch} {name}: decode {row['pruned']['decode_tok_s']:.1f} vs dense "
            f"{dense['decode_tok_s']:.1f} tok/s ({row['decode_speedup']:.2f}x), TTFT {row['pruned']['ttft_s']:.3f} "
            f"vs {dense['ttft_s']:.3f} s")


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report["rows"]
    keys = list(dict.fromkeys((r["mode"], r["batch"]) for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.6))
    width = 0.8 / max(len(variants), 1)
    for k, v in enumerate(variants):
        pos = [i + (k - (len(variants) - 1) / 2) * width for i in range(len(keys))]
        for ax, key in ((ax0, "decode_speedup"), (ax1, "ttft_speedup")):
            vals = [next((r[key] for r in rows if (r["mode"], r["batch"]) == mb and r["variant"] == v), float("nan"))
                    for mb in keys]
            bars = ax.bar(pos, vals, width, label=v)
            for b, val in zip(bars, vals):
                ax.text(b.get_x() + b.get_width() / 2, val + 0.01, f"{val:.2f}", ha="center", va="bottom", fontsize=6)
    for ax, title in ((ax0, "decode tokens/s, pruned / dense"), (ax1, "time to first token, dense / pruned")):
        ax.axhline(1.0, color="r", lw=0.8)
        ax.set_xticks(range(len(keys)), [f"{m}, batch {b}" for m, b in keys])
        ax.set_title(title)
        ax.legend(fontsize=7)
    ax0.axhline(1.2, color="g", ls=":", lw=1)
    ax0.axhline(1.8, color="b", ls=":", lw=1)
    m = report["machine"]
    fig.suptitle(f"SmolLM2-135M-Instruct {report['settings']['dtype']} on {report['settings']['device']}, "
                 f"prompt {report['settings']['prompt']}, {report['settings']['new']} new tokens; {m['cpu']}, "
                 f"{m['torch_threads']} threads; {report['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(report: dict, png: Path) -> str:
    s = report["settings"]
    lines = report_head("Generation speed with a KV cache, pruned vs dense (issues 14, 31)", report) + [
        f"SmolLM2-135M-Instruct {s['dtype']} on {s['device']} ({report['params_dense']:,} parameters), "
        + (f"pruned models loaded from {', '.join(s['load'])} (their own plans)" if s.get("load") else
           f"pruned with {s['importance']} importance, heads + MLP, protected layers {tuple(s['protect'])}")
        + f". Prompt {s['prompt']} random "
        f"tokens, {s['new']} new tokens, greedy; {s['runs']} rounds alternating dense and every pruned variant, "
        "medians. Dense: Hugging Face `generate` with its cache (eager: DynamicCache; compile: static cache and "
        "`torch.compile`d forward). Pruned: `fxprune.serving.generation.Generator` (static KV cache holding the kept KV "
        "heads only; compile: its program `torch.compile(dynamic=True)`). The dense side includes Hugging "
        "Face's generation loop (logits processors, stopping criteria, a DynamicCache that grows by concatenation) "
        "while the pruned side runs one captured program per step over a preallocated cache, attending over its "
        "filled part only: part of a difference can come from the program, not from the pruning. "
        + (f"The row `{DENSE_PROGRAM}` is the dense model through that same program (a plan that removes "
           "nothing); the last column divides by it: the speedup of the pruning alone."
           if DENSE_PROGRAM in report["variants"] else "No run here measures the dense model through the same "
           "program."), "",
        "Variants: " + "; ".join(f"{n}: {v['params']:,} parameters ({v['removed_fraction']:.2%} removed"
                                 + (f", MLP widths {v['mlp_widths']}" if v.get("mlp_widths") else "") + ")"
                                 for n, v in report["variants"].items()), ""]
    heads = ["mode", "batch", "variant", "dense decode tok/s", "pruned decode tok/s", "decode speedup",
             "dense TTFT s", "pruned TTFT s", "TTFT speedup", "dense gen tok/s", "pruned gen tok/s",
             "decode speedup over the dense program"]
    rows = [[r["mode"], r["batch"], r["variant"], f"{r['dense']['decode_tok_s']:.1f}",
             f"{r['pruned']['decode_tok_s']:.1f}", f"**{r['decode_speedup']:.2f}**", f"{r['dense']['ttft_s']:.3f}",
             f"{r['pruned']['ttft_s']:.3f}", f"{r['ttft_speedup']:.2f}", f"{r['dense']['gen_tok_s']:.1f}",
             f"{r['pruned']['gen_tok_s']:.1f}",
             f"{r['program_decode_speedup']:.2f}" if "program_decode_speedup" in r else "-"] for r in report["rows"]]
    done = {(r["mode"], r["batch"]) for r in report["rows"]}
    missing = [f"{m} batch {b}" for m in s.get("modes", []) for b in s.get("batches", []) if (m, b) not in done]
    lines += [md_table(heads, rows), ""]
    if missing:
        lines += ["Not measured in this run: " + ", ".join(missing) + ".", ""]
    for e in report.get("earlier_runs", []):
        if e["rows"]:
            lines += [f"Rows {', '.join(e['rows'])} come from an earlier run ({e['date']}, `{e['command']}`, load "
                      f"average at start/end {e['load_average_start']} / {e['load_average_end']}).", ""]
    lines += extra_tables(report)
    lines += [*[f"{n}" for n in report.get("notes", [])], "",
              "Setup (program capture, warm-up, compilation) per mode and batch: "
              + "; ".join(f"{k}: {v:.0f} s" for k, v in report["setup_s"].items()), "",
              f"![decode speedup and time to first token]({png.name})", ""]
    return "\n".join(lines)


GOALS = (("eager", 1, 0.2, 1.25), ("eager", 8, 0.2, 1.2), ("eager", 1, 0.5, 1.8))  # issue 31, decode speedups


def goal_lines(report: dict) -> list[str]:
    """The issue's goals against this run's rows (variants matched by the fraction removed)."""
    def ratio_of(name):
        return round(report["variants"][name]["removed_fraction"], 1)
    out = []
    for mode, batch, ratio, goal in GOALS:
        for r in report["rows"]:
            if (r["mode"], r["batch"]) != (mode, batch) or r["variant"] == DENSE_PROGRAM or ratio_of(r["variant"]) != ratio:
                continue
            out.append([f"{mode} decode, batch {batch}, {r['variant']}", f">= {goal}", f"{r['decode_speedup']:.2f}",
                        "yes" if r["decode_speedup"] >= goal else "no"])
            if batch == 1 and ratio == 0.2:
                out.append([f"{mode} time to first token, batch 1, {r['variant']}", ">= 1.0 (dense / pruned)",
                            f"{r['ttft_speedup']:.2f}", "yes" if r["ttft_speedup"] >= 1.0 else "no"])
    for r in report.get("prefill", []):
        if r["mode"] == "eager" and ratio_of(r["variant"]) == 0.2:
            out.append([f"eager prefill {r['batch']} x {r['seq']}, {r['variant']}", ">= 1.2", f"{r['speedup']:.2f}",
                        "yes" if r["speedup"] >= 1.2 else "no"])
    for name, c in report.get("cold_start", {}).items():
        out.append([f"first fxprune.generate call (32 tokens), {name}", "< 3 s", f"{c['first_call_32_tokens_s']:.1f} s",
                    "yes" if c["first_call_32_tokens_s"] < 3 else "no"])
        if "stored_first_call_32_tokens_s" in c:
            out.append([f"first fxprune.generate call, program stored (32 tokens), {name}", "< 3 s",
                        f"{c['stored_first_call_32_tokens_s']:.1f} s",
                        "yes" if c["stored_first_call_32_tokens_s"] < 3 else "no"])
    return out


def extra_tables(report: dict) -> list[str]:
    lines = []
    if report.get("prefill"):
        lines += ["Prefill without a cache (the GraphModule against the Hugging Face model, `use_cache=False`), "
                  "medians of alternating rounds:", "",
                  md_table(["mode", "batch x seq", "variant", "dense tok/s", "pruned tok/s", "speedup"],
                           [[r["mode"], f"{r['batch']} x {r['seq']}", r["variant"], f"{r['dense_tok_s']:.0f}",
                             f"{r['pruned_tok_s']:.0f}", f"**{r['speedup']:.2f}**"] for r in report["prefill"]]), ""]
    if report.get("cold_start"):
        lines += ["First `fxprune.generate` call with nothing captured or stored (capture, analysis, rewrite and 32 "
                  "tokens after a 16-token prompt), a later call of 8 tokens on the same GraphModule, and a first "
                  "call with nothing in memory but the program in the store (`fxprune.serving.program_store`, as "
                  "in a new process):", "",
                  md_table(["variant", "first call s", "later call s", "first call, program stored s"],
                           [[n, f"{c['first_call_32_tokens_s']:.1f}", f"{c['later_call_8_tokens_s']:.2f}",
                             f"{c['stored_first_call_32_tokens_s']:.2f}" if "stored_first_call_32_tokens_s" in c
                             else "-"] for n, c in report["cold_start"].items()]), ""]
    goals = goal_lines(report)
    if goals:
        lines += ["Goals (issue 31):", "", md_table(["what", "goal", "measured", "met"], goals), ""]
    return lines


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    import torch
    torch.set_num_threads(args.threads)
    from fxprune.serving.generation import Generator
    from fxprune.data.models import load_model

    out = Path(args.out)
    if args.render_only:
        report = json.loads(out.with_suffix(".json").read_text())
        report["notes"] = report.get("notes", []) + args.note
        return write_outputs(report, out)
    report = header(args.threads)
    report["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    report.update(variants={}, rows=[], setup_s={}, prefill=[], cold_start={})
    if args.append and out.with_suffix(".json").exists():
        merge_earlier(report, json.loads(out.with_suffix(".json").read_text()))
    model, _ = load_model(args.model, dtype=getattr(torch, args.dtype))
    pruned = prune_variants(model, args, report)
    model.to(args.device).eval()
    if args.cold_start:
        run_cold_start(pruned, args, report)
    # One cache length for the first-token and the full runs, so both use the same (compiled) program.
    generators = {name: Generator(gm, device=args.device, cache_block=args.prompt + args.new)
                  for name, gm in pruned.items()}
    for mode in args.modes:  # eager first: compile mode wraps the programs the eager rounds built
        torch._dynamo.reset()
        for batch in args.batches:
            with torch.inference_mode():
                run_batch(model, generators, args, mode, batch, report)
            write_json(out.with_suffix(".json"), report)
        if mode == "compile":
            model.forward = type(model).forward.__get__(model)  # undo the compiled forward
        if args.prefill:
            run_prefill(model, {n: gm for n, gm in pruned.items() if n != DENSE_PROGRAM}, args, mode, report)
            write_json(out.with_suffix(".json"), report)
    finish(report)
    return write_outputs(report, out)


def merge_earlier(report: dict, old: dict) -> None:
    """--append: the earlier run's rows of other (mode, batch) pairs stay, with its date, command and load."""
    measured = {(m, b) for m in report["settings"]["modes"] for b in report["settings"]["batches"]}
    kept = [r for r in old["rows"] if (r["mode"], r["batch"]) not in measured]
    report["rows"] = kept
    report["setup_s"] = {k: v for k, v in old["setup_s"].items() if k in {f"{r['mode']} batch {r['batch']}" for r in kept}}
    s = report["settings"]
    s["modes"] = list(dict.fromkeys(old["settings"]["modes"] + s["modes"]))
    s["batches"] = sorted(set(old["settings"]["batches"] + s["batches"]))
    earlier = {k: old.get(k) for k in ("date", "command", "load_average_start", "load_average_end",
                                       "other_processes_start", "other_processes_end")}
    earlier["rows"] = sorted({f"{r['mode']} batch {r['batch']}" for r in kept})
    report["earlier_runs"] = old.get("earlier_runs", []) + [earlier]


def write_outputs(report: dict, out: Path) -> dict:
    return common_outputs(report, out, plot, render)


if __name__ == "__main__":
    main()
