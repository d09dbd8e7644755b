"""Run the benchmarks that fit in about half an hour on a 2-core CPU, then write benchmarks/results/report.md.

Default (quick) steps, each in its own process:
  1. importance sweep: ratios 0.1-0.5, estimators l2 / element1 / element2 (one shared gradient pass),
     WikiText-2 perplexity on the first 10,240 tokens      -> results/importance_sweep.{json,md,png}
  2. throughput, eager only, 5 timed pairs                 -> results/throughput_quick.{json,md,png}
  3. Torch-Pruning comparison at 20%, 10,240 tokens        -> results/torch_pruning_quick.{json,md}
`--full` runs the full protocols instead (issue 4 table, throughput eager + torch.compile, Torch-Pruning at
20% and 50%; a few hours on 2 cores) into their default outputs. `--report-only` just rebuilds report.md.
report.md gathers every results file present (full and quick), each with its own machine, date and command.

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
                          "--methods", "l2", "element1", "element2", "--eval-tokens", "10240",
                          "--out", str(RESULTS / "importance_sweep")]),
    ("throughput (eager)", ["benchmarks.throughput", "--modes", "eager", "--runs", "5",
                            "--out", str(RESULTS / "throughput_quick")]),
    ("Torch-Pruning comparison (20%)", ["benchmarks.torch_pruning_compare", "--ratios", "0.2", "--eval-tokens", "10240",
                                        "--out", str(RESULTS / "torch_pruning_quick")]),
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
    ("throughput_quick", "Throughput, eager (quick)"),
    ("torch_pruning_compare", "fxprune vs Torch-Pruning"),
    ("torch_pruning_quick", "fxprune vs Torch-Pruning, 20% (quick)"),
]


def demote(md: str) -> str:
    """Headings one level down, so each results file becomes a section of the report."""
    return "\n".join("#" + line if line.startswith("#") else line for line in md.splitlines())


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
