"""Run the benchmarks that fit in about half an hour on a 2-core CPU, then write benchmarks/results/report.md.

Default (quick) steps, each in its own process:
  1. importance sweep: ratios 0.1-0.5, every estimator (random, l2, vector, element1, element2, HyWIA),
     WikiText-2 perplexity on the first 10,240 tokens    -> results/importance_sweep.*
  2. Torch-Pruning's LLM recipe at the parameter counts of fxprune's plans, ratios 0.1-0.5, same protocol,
     with its pruning time and memory                                        -> results/torch_pruning_quick.*
  3. throughput at 4 x 512, eager and torch.compile                          -> results/throughput_quick.*
  4. meta-device capture and analysis of Llama-2-7B/13B and Llama-3-70B       -> results/meta_scale.*
  5. generation (KV cache) tokens/s and time to first token, prompt 128, 128 new, batch 1 and 8, 20% and 50%,
     round_to 64 and unrounded, eager and compiled, against Hugging Face generate -> results/decode.*
then results/quality_vs_ratio.png (every method and Torch-Pruning on one plot) and report.md.
`--full` runs the full protocols instead (issue 4 table on 20,480 tokens, the throughput grid, Torch-Pruning at
20% and 50% on 20,480 tokens; about two hours on 2 cores) into their default outputs. `--report-only` rebuilds
report.md. report.md gathers every results file present (full and quick), each with its machine, date and command.

Usage: make bench   (or: PYTHONPATH=. python -m benchmarks.run_all [--full | --report-only] [--data-dir DIR])
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone

from benchmarks.common import RESULTS, command, load_average, log, machine, md_table

QUICK = [
    ("importance sweep", ["benchmarks.importance_table", "--ratios", "0.1", "0.2", "0.3", "0.4", "0.5",
                          "--eval-tokens", "10240",
                          "--out", str(RESULTS / "importance_sweep")]),
    ("Torch-Pruning comparison, ratios 0.1-0.5", ["benchmarks.torch_pruning_compare", "--ratios", "0.1", "0.2", "0.3",
                                                  "0.4", "0.5", "--eval-tokens", "10240",
                                                  "--out", str(RESULTS / "torch_pruning_quick")]),
    ("throughput at 4 x 512, eager and compiled", ["benchmarks.throughput", "--batches", "4", "--seqs", "512",
                                                   "--runs", "5", "--out", str(RESULTS / "throughput_quick")]),
    ("meta-device scale", ["benchmarks.meta_scale"]),
    ("decode speed with a KV cache, batch 1 and 8, eager and compiled", ["benchmarks.decode", "--runs", "2"]),
]
FULL = [
    ("importance table (issue 4)", ["benchmarks.importance_table"]),
    ("throughput (issue 6)", ["benchmarks.throughput"]),
    ("Torch-Pruning comparison (issue 6)", ["benchmarks.torch_pruning_compare"]),
]
# report sections: (results file stem, title), in order
SECTIONS = [
    ("importance_table", "Importance estimators, issue 4 protocol"),
    ("importance_sweep", "Importance sweep, ratios 0.1-0.5 (quick)"),
    ("throughput", "Throughput, eager and torch.compile"),
    ("throughput_quick", "Throughput at 4 x 512, eager and torch.compile (quick)"),
    ("torch_pruning_compare", "fxprune vs Torch-Pruning"),
    ("torch_pruning_quick", "fxprune vs Torch-Pruning, ratios 0.1-0.5 (quick)"),
    ("meta_scale", "Meta-device capture and analysis at scale"),
    ("decode", "Generation speed with a KV cache (issue 14)"),
    ("headline", "The headline call with nothing else given"),
    ("reconstruction_table", "Importance x reconstruction over calibration draws (issue 13)"),
    ("reconstruction_table_wikitext", "The same, calibrated on WikiText-2 validation text (issue 13)"),
    ("reconstruction_table_stream", "Refit to the dense stream, obs + absolute allocation, in-domain (issue 13)"),
    ("reconstruction_table_stream_c4", "Refit to the dense stream, C4 calibration: the default's setting (issue 13)"),
    ("reconstruction_table_stream_c4_refitchoice", "HyWIA validated after the refit (an option), C4 calibration (issue 13)"),
    ("reconstruction_table_stream_bf16_refit160", "Best configuration: obs + absolute, 160 bfloat16 refit windows (issue 13)"),
    ("reconstruction_table_stream_bf16_refit160_eval20k", "The same on the first 20,480 tokens, the goals' span (issue 13)"),
    ("reconstruction_cost", "Cost of the least-squares refit beside scoring (issue 13)"),
    ("e2e_smollm2", "Prune, recover, evaluate: perplexity and the seven tasks (issue 16)"),
]


def plot_quality() -> bool:
    """Every estimator of the sweep and Torch-Pruning's recipe, perplexity against parameters removed."""
    sweep, tp = RESULTS / "importance_sweep.json", RESULTS / "torch_pruning_quick.json"
    if not (sweep.exists() and tp.exists()):
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    a, b = json.loads(sweep.read_text()), json.loads(tp.read_text())
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for m in a["settings"]["methods"]:
        pts = sorted((r["removed_fraction"], r["ppl"]) for r in a["rows"] if r["method"] == m)
        ax.plot(*zip(*pts), marker="o", label=f"fxprune {m}")
    pts = sorted((r["removed_fraction"], r["ppl"]) for r in b["rows"] if r["tool"] == "torch-pruning")
    if pts:
        ax.plot(*zip(*pts), marker="x", color="k", lw=2, label="Torch-Pruning LLM recipe")
    ax.axhline(a["dense"]["ppl"], color="gray", ls="--", lw=1, label=f"dense {a['dense']['ppl']:.1f}")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of parameters removed")
    ax.set_ylabel("WikiText-2 perplexity (128-token windows)")
    m = a["machine"]
    ax.set_title(f"SmolLM2-135M-Instruct, no tuning, first {a['settings']['eval_tokens']:,} tokens\n"
                 f"{m['cpu']}, {m['cores']} cores; sweep {a['date']}, Torch-Pruning {b['date']}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(RESULTS / "quality_vs_ratio.png", dpi=120)
    plt.close(fig)
    return True


def demote(md: str) -> str:
    """Headings two levels down: a results file's title (#) sits under its report section (##)."""
    return "\n".join("##" + line if line.startswith("#") else line for line in md.splitlines())


def write_report(steps: list[dict], ran_now: bool) -> None:
    parts = ["# fxprune benchmark report", "",
             f"Written {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} by `{command()}`. Every section "
             "below comes from a results file in this folder and states its own machine, date and command; "
             "numbers are measured, none are typed in.", ""]
    if steps:
        m = machine()
        parts += [f"This run: {m['cpu']} ({m['cores']} cores), load average at the end {load_average()}."
                  if ran_now else "The last `run_all` (from `run_all.json`):", "",
                  md_table(["step", "wall min", "exit status"],
                           [[s["name"], f"{s['wall_s'] / 60:.1f}", s["rc"]] for s in steps]), ""]
    if plot_quality():
        parts += ["![perplexity against ratio, every method and Torch-Pruning](quality_vs_ratio.png)", ""]
    present = [(stem, title) for stem, title in SECTIONS if (RESULTS / f"{stem}.md").exists()]
    missing = [stem for stem, _ in SECTIONS if not (RESULTS / f"{stem}.md").exists()]
    parts += ["Contents: " + ", ".join(f"[{title}](#{stem.replace('_', '-')})" for stem, title in present), ""]
    if missing:
        parts += ["Not present (not run yet): " + ", ".join(f"`{m}`" for m in missing), ""]
    for stem, title in present:
        parts += [f'<a id="{stem.replace("_", "-")}"></a>', "", f"## {title}", "",
                  f"From `{stem}.md` / `{stem}.json`.", "", demote((RESULTS / f"{stem}.md").read_text()), ""]
    (RESULTS / "report.md").write_text("\n".join(parts))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--data-dir", default=None, help="default: $FXPRUNE_DATA_DIR")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ)
    if args.data_dir:
        env["FXPRUNE_DATA_DIR"] = args.data_dir
    repo = str(RESULTS.parent.parent)
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    steps = []
    if not args.report_only:
        for name, cmd in FULL if args.full else QUICK:
            log(f"{name}: python -m {' '.join(cmd)}")
            t = time.perf_counter()
            rc = subprocess.run([sys.executable, "-m", *cmd], cwd=repo, env=env).returncode
            steps.append({"name": name, "command": cmd, "wall_s": time.perf_counter() - t, "rc": rc})
            log(f"{name}: exit {rc} after {steps[-1]['wall_s'] / 60:.1f} min")
        (RESULTS / "run_all.json").write_text(json.dumps({"command": command(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                                                     "machine": machine(), "steps": steps}, indent=1))
    elif (RESULTS / "run_all.json").exists():
        steps = json.loads((RESULTS / "run_all.json").read_text())["steps"]
    write_report(steps, not args.report_only)
    log(f"wrote {RESULTS / 'report.md'}")
    return 0 if all(s["rc"] == 0 for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
