"""Issue 5 end to end on the embedded SmolLM2-135M-Instruct, CPU:
prune 20% (HyWIA) -> LoRA on Alpaca-cleaned 5k (a fixed step budget) -> WikiText-2 ppl and zero-shot
accuracy of the dense, pruned and tuned models. Each step is the CLI, run as a subprocess.

Usage: FXPRUNE_DATA_DIR=../shared/data python -m benchmarks.e2e_smollm2 [--steps 150] [--limit 300] [--resume]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import report_head, RESULTS as OUT, finish, header, md_table
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
    p.add_argument("--resume", action="store_true",
                   help="reuse the pruned and tuned models an interrupted run left in --work; without it the work "
                        "directory is cleared, so the figures always come from the code at hand")
    a = p.parse_args(argv)
    data = Path(os.environ["FXPRUNE_DATA_DIR"])
    work = Path(a.work)
    start = header()
    pruned, tuned = work / "pruned", work / "tuned"
    if not a.resume:  # only what this script writes: --work may name a directory that holds other things
        for stale in (pruned, tuned, work / "ckpt"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in (work / "tune.json", work / "times.json", *work.glob("eval_*.json")):
            stale.unlink(missing_ok=True)
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
    losses = [h["loss"] for h in tune.get("history", [])]
    tune["loss_first10"] = sum(losses[:10]) / max(len(losses[:10]), 1)
    tune["loss_last10"] = sum(losses[-10:]) / max(len(losses[-10:]), 1)
    if (work / "times.json").exists():  # wall times of steps run by an earlier invocation
        times = {**json.loads((work / "times.json").read_text()), **times}
    (work / "times.json").write_text(json.dumps(times))
    report = {**finish(start),
              "lora": {"steps": a.steps, "micro_batch": a.batch_size, "cutoff": 256, "r": 8, "alpha": 16, "lr": 1e-4,
                       "examples_seen": a.steps * a.batch_size, **{k: tune[k] for k in tune if k != "history"}},
              "zero_shot_limit": a.limit, "ppl_tokens": a.eval_tokens, "rows": rows, "times_s": times}
    (OUT / "e2e_smollm2.json").write_text(json.dumps(report, indent=1, default=str))
    lora = report["lora"]
    lines = report_head("End to end on SmolLM2-135M-Instruct: prune 20% -> LoRA -> evaluate (issue 5)", report) + [
             f"WikiText-2 test perplexity on 128-token windows over the first {a.eval_tokens:,} tokens; zero-shot "
             f"accuracy by log-likelihood on the first {a.limit} examples of each task (acc, the lm-eval-harness "
             "metric for these four tasks; acc_norm in brackets). Pruning: `fxprune prune` defaults (HyWIA, 20%, "
             "heads + MLP, layers 0-2 and the last 2 protected, 32 x 128 C4 calibration tokens). LoRA budget on this "
             f"CPU: {lora['steps']} steps x {lora['micro_batch']} Alpaca-cleaned examples ({lora['examples_seen']:,} of "
             f"5,000; cutoff 256, r 8, alpha 16, dropout 0.05, lr 1e-4, fp32), about "
             f"{times.get('tune_s', float('nan')) / 60:.0f} min of tuning (wall, including loading and merging); "
             f"training loss, mean of the first / last 10 steps: {lora['loss_first10']:.3f} / {lora['loss_last10']:.3f}.", "",
             md_table(["model", "parameters", "WikiText-2 ppl"] + TASKS + ["mean acc"],
                      [[name, f"{r.get('parameters', 0):,}", f"{r['wikitext2_ppl']:.2f}"]
                       + [f"{r[t]['acc']:.3f} ({r[t]['acc_norm']:.3f})" for t in TASKS]
                       + [f"{sum(r[t]['acc'] for t in TASKS) / len(TASKS):.3f}"] for name, r in rows.items()]),
             "", "Wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()), ""]
    (OUT / "e2e_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
