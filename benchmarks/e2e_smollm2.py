"""Issue 5 end to end on the embedded SmolLM2-135M-Instruct, CPU:
prune 20% (HyWIA) -> LoRA on Alpaca-cleaned 5k (a fixed step budget) -> WikiText-2 ppl and zero-shot
accuracy of the dense, pruned and tuned models. Each step is the CLI, run as a subprocess.

Usage: FXPRUNE_DATA_DIR=../shared/data python -m benchmarks.e2e_smollm2 [--steps 150] [--limit 300]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

OUT = Path("benchmarks/results")
TASKS = ["piqa", "arc_easy", "boolq", "winogrande"]


def run(*args) -> float:
    t = time.time()
    subprocess.run([sys.executable, "-m", "fxprune.cli", *args], check=True)
    return time.time() - t


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--limit", type=int, default=300)
    p.add_argument("--eval-tokens", type=int, default=20480)
    p.add_argument("--work", default="out/e2e")
    a = p.parse_args(argv)
    data = Path(os.environ["FXPRUNE_DATA_DIR"])
    work = Path(a.work)
    pruned, tuned = work / "pruned", work / "tuned"
    times = {}
    if not (pruned / "fxprune.json").exists():
        times["prune_s"] = run("prune", "--output", str(pruned), "--eval-tokens", "0")
    if not (tuned / "fxprune.json").exists() or not (work / "tune.json").exists():
        times["tune_s"] = run("tune", str(pruned), "--data", str(data / "alpaca" / "alpaca_cleaned_5k.json"),
                              "--max-steps", str(a.steps), "--batch-size", str(a.batch_size), "--cutoff-len", "256",
                              "--output-dir", str(work / "ckpt"), "--checkpoint-every", "50",
                              "--merged", str(tuned), "--result", str(work / "tune.json"))
    rows = {}
    for name, target, extra in (("dense", None, []), ("pruned 20%", pruned, []),
                                ("pruned 20% + LoRA", tuned, ["--tokenizer", str(pruned)])):
        js = work / f"eval_{name.split()[0]}{'_lora' if 'LoRA' in name else ''}.json"
        args = ["eval"] + ([str(target)] if target else []) + extra + [
            "--limit", str(a.limit), "--eval-tokens", str(a.eval_tokens), "--json", str(js)]
        times[f"eval_{name}_s"] = run(*args)
        rows[name] = json.loads(js.read_text())
    tune = json.loads((work / "tune.json").read_text())
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs)",
              "date": str(date.today()), "command": " ".join(["python -m benchmarks.e2e_smollm2"] + (argv or sys.argv[1:])),
              "lora": {"steps": a.steps, "micro_batch": a.batch_size, "cutoff": 256, "r": 8, "alpha": 16, "lr": 1e-4,
                       "examples_seen": a.steps * a.batch_size, **{k: tune[k] for k in tune if k != "history"}},
              "zero_shot_limit": a.limit, "ppl_tokens": a.eval_tokens, "rows": rows, "times_s": times}
    (OUT / "e2e_smollm2.json").write_text(json.dumps(report, indent=1, default=str))
    lines = [f"SmolLM2-135M-Instruct, {report['date']}, {report['machine']}. WikiText-2 test ppl, 128-token windows, "
             f"first {a.eval_tokens} tokens; zero-shot acc (acc_norm) on the first {a.limit} examples of each task; "
             f"LoRA: {a.steps} steps x {a.batch_size} Alpaca examples (cutoff 256, r 8, alpha 16, lr 1e-4, CPU fp32).", "",
             "| model | ppl | " + " | ".join(TASKS) + " |", "|---|---|" + "---|" * len(TASKS)]
    for name, r in rows.items():
        accs = " | ".join(f"{r[t]['acc']:.3f} ({r[t]['acc_norm']:.3f})" for t in TASKS)
        lines.append(f"| {name} | {r['wikitext2_ppl']:.2f} | {accs} |")
    lines += ["", "Wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())]
    (OUT / "e2e_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
