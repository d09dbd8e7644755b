"""End to end on the embedded SmolLM2-135M-Instruct, CPU: prune (HyWIA, 20% and 50%) -> recover at a fixed
budget (LoRA alone, distillation from the dense model with LoRA, distillation of the full pruned weights)
-> WikiText-2 perplexity and the seven zero-shot tasks of the dense, pruned and recovered models.
Each step is the CLI, run as a subprocess; every finished step is kept in --work and the report is
rewritten after each one, so an interrupted run still reports what it measured (and --resume goes on).

Usage: FXPRUNE_DATA_DIR=../shared/data python -m benchmarks.e2e_smollm2 [--ratios 0.2 0.5] [--steps 150]
       [--limit 100] [--recoveries kd_full kd_lora lora] [--stages prune tune ppl zeroshot] [--resume]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import RESULTS as OUT, finish, header, load_average, md_table, report_head

from fxprune.evaluation.tasks import REPORTED as METRIC, TASKS  # noqa: E402  (the metric the seeds report per task)

ALPACA, C4 = ("alpaca", "alpaca_cleaned_5k.json"), ("c4", "c4_sample.json")
RECOVERIES = {  # name -> (label, extra `fxprune tune` options, training data under the data directory)
    "lora": ("LoRA", [], ALPACA),
    "kd_lora": ("distil + LoRA", ["--teacher"], ALPACA),
    "kd_full": ("distil, full weights", ["--teacher", "--trainable", "full"], ALPACA),
    # C4 text packed into cutoff-length windows: distillation on general text, as Minitron distils on
    # pre-training data (C4 is not the evaluation text; it is the calibration source).
    "kd_full_c4": ("distil, full weights, C4 text", ["--teacher", "--trainable", "full"], C4),
}
STAGES = ("prune", "tune", "ppl", "zeroshot")


def run(*args) -> dict:
    """Run the CLI; its wall time and the load average before and after."""
    load, t = load_average(), time.time()
    subprocess.run([sys.executable, "-m", "fxprune.cli", *args], check=True)
    return {"wall_s": round(time.time() - t, 1), "load_start": load, "load_end": load_average()}


def parse(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--importance", default="hywia")
    p.add_argument("--name", default="e2e_smollm2", help="results file name under benchmarks/results (no extension)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--limit", type=int, default=100, help="first N examples of each zero-shot task")
    p.add_argument("--eval-tokens", type=int, nargs="+", default=[10240, 20480])
    p.add_argument("--recoveries", nargs="+", default=list(RECOVERIES), choices=list(RECOVERIES))
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--jobs", type=int, default=1, help="recoveries trained at once (each its own process)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per CLI process (OMP_NUM_THREADS); 1 avoids OpenMP spin-waits on a busy machine")
    p.add_argument("--work", default="out/e2e")
    p.add_argument("--resume", action="store_true",
                   help="reuse the models and evaluations an earlier run left in --work; without it the files this "
                        "script writes there are cleared, so the figures always come from the code at hand")
    return p.parse_args(argv)


class Run:
    def __init__(self, a):
        self.a, self.work = a, Path(a.work)
        self.data = Path(os.environ["FXPRUNE_DATA_DIR"])
        self.state_path = self.work / "state.json"
        if not a.resume:  # only what this script writes: --work may hold other things
            for stale in self.work.glob("r*"):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else None
            for name in ("dense", "state.json"):
                p = self.work / name
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {"models": {}}
        self.start = header(a.threads)
        self.lock = threading.Lock()
        if a.threads:
            os.environ["OMP_NUM_THREADS"] = str(a.threads)  # inherited by every CLI subprocess

    def save(self):
        with self.lock:
            self.state_path.write_text(json.dumps(self.state, indent=1))
            write_report(self.a, finish(dict(self.start)), self.state)

    def model(self, key) -> dict:
        return self.state["models"].setdefault(key, {})

    def prune(self, ratio):
        pruned = self.work / f"r{int(ratio * 100)}" / "pruned"
        if not (pruned / "fxprune.json").exists():
            self.model(f"r{int(ratio * 100)}/pruned")["prune"] = run(
                "prune", "--ratio", str(ratio), "--importance", self.a.importance, "--output", str(pruned),
                "--eval-tokens", "0")
            self.save()
        return pruned

    def tune(self, ratio, name):
        root = self.work / f"r{int(ratio * 100)}"
        tuned, result = root / name, root / f"{name}.json"
        if (tuned / "fxprune.json").exists() and result.exists():
            return
        _, extra, data = RECOVERIES[name]
        times = run("tune", str(root / "pruned"), "--data", str(self.data.joinpath(*data)),
                    "--max-steps", str(self.a.steps), "--batch-size", str(self.a.batch_size), "--cutoff-len", "256",
                    "--lr", str(self.a.lr), "--output-dir", str(root / f"{name}_ckpt"), "--checkpoint-every", "50",
                    "--resume", "--merged", str(tuned), "--result", str(result), *extra)
        history = json.loads(result.read_text())["history"]
        first, last = history[:10], history[-10:]
        self.model(f"r{int(ratio * 100)}/{name}")["tune"] = {
            **times, "steps": len(history), "options": extra,
            "loss_first10": sum(h["loss"] for h in first) / len(first),
            "loss_last10": sum(h["loss"] for h in last) / len(last)}
        self.save()

    def evaluate(self, key, target, stage):
        entry = self.model(key)
        if stage in entry:
            return
        js = self.work / f"eval_{key.replace('/', '_')}_{stage}.json"
        where = [] if target is None else [str(target)] + (
            ["--tokenizer", str(target.parent / "pruned")] if target.name != "pruned" else [])
        if stage == "ppl":
            args = ["--tasks", "ppl", "--eval-tokens", *map(str, self.a.eval_tokens)]
        else:
            args = ["--tasks", *TASKS, "--limit", str(self.a.limit)]
        if self.a.resume and js.exists():  # written by an earlier (or separately started) run of the same command
            entry[stage] = json.loads(js.read_text())
        else:
            times = run("eval", *where, *args, "--json", str(js))
            entry[stage] = {**json.loads(js.read_text()), "eval": times}
        self.save()


def main(argv=None):
    a = parse(argv)
    r = Run(a)
    for stage in ("ppl", "zeroshot"):
        if stage in a.stages:
            r.evaluate("dense", None, stage)
    for ratio in a.ratios:
        root = r.work / f"r{int(ratio * 100)}"
        if "prune" in a.stages:
            r.prune(ratio)
        if "tune" in a.stages:
            with ThreadPoolExecutor(a.jobs) as pool:
                list(pool.map(lambda name: r.tune(ratio, name), a.recoveries))
        for stage in ("ppl", "zeroshot"):
            if stage not in a.stages:
                continue
            for name in ["pruned"] + a.recoveries:
                if (root / name / "fxprune.json").exists():
                    r.evaluate(f"r{int(ratio * 100)}/{name}", root / name, stage)
    r.save()


def _row_label(key):
    if key == "dense":
        return "dense"
    ratio, name = key.split("/")
    pct = f"{ratio[1:]}%"
    return f"pruned {pct}" if name == "pruned" else f"pruned {pct} + {RECOVERIES[name][0]}"


def _row_order(item):
    """dense first, then each ratio: pruned, then the recoveries in RECOVERIES' order (runs may finish in any order)."""
    key = item[0]
    if key == "dense":
        return (0, "", -1)
    ratio, name = key.split("/")
    return (1, ratio, -1 if name == "pruned" else list(RECOVERIES).index(name))


def _task_cell(result) -> str:
    m = result[METRIC[result["task"]]] if "task" in result else None
    return "-" if m is None else f"{m:.3f} ± {result[METRIC[result['task']] + '_stderr']:.3f}"


def write_report(a, report, state):
    models = state["models"]
    report.update(settings={"steps": a.steps, "micro_batch": a.batch_size, "cutoff": 256, "lr": a.lr,
                            "lora": {"r": 8, "alpha": 16, "dropout": 0.05}, "zero_shot_limit": a.limit,
                            "ppl_tokens": a.eval_tokens, "window": 128}, models=models)
    (OUT / f"{a.name}.json").write_text(json.dumps(report, indent=1, default=str))
    ppl_cols = [f"ppl {n:,} tok" for n in a.eval_tokens]
    rows = []
    for key, m in sorted(models.items(), key=_row_order):
        ppl = m.get("ppl", {}).get("wikitext2_ppl_by_tokens", {})
        tune = m.get("tune", {})
        zs = m.get("zeroshot", {})
        cells = [_task_cell({**zs[t], "task": t}) if t in zs else "-" for t in TASKS]
        mean = zs.get("mean")
        rows.append([_row_label(key), f"{zs.get('parameters') or m.get('ppl', {}).get('parameters', 0):,}"]
                    + [f"{ppl[str(n)]:.2f}" if str(n) in ppl else (f"{ppl[n]:.2f}" if n in ppl else "-")
                       for n in a.eval_tokens]
                    + [f"{tune['wall_s'] / 60:.1f} (load {tune['load_start'][0]}→{tune['load_end'][0]})"
                       if tune else "-"]
                    + cells + [f"{mean['value']:.3f} ± {mean['stderr']:.3f}" if mean else "-"])
    lines = report_head("End to end on SmolLM2-135M-Instruct: prune -> recover -> evaluate (issues 5, 16)", report) + [
        f"WikiText-2 test perplexity on 128-token windows over the first {' and '.join(f'{n:,}' for n in a.eval_tokens)} "
        f"tokens. Pruning: `fxprune prune --importance {a.importance}` (heads + MLP, layers 0-2 and the last 2 "
        f"protected, 32 x 128 calibration tokens). Recovery budget on this CPU: {a.steps} steps x {a.batch_size} Alpaca-cleaned examples (cutoff 256, "
        f"lr {a.lr:g}, AdamW, fp32; the C4 rows read the C4 sample's documents packed into 256-token windows "
        "instead); LoRA r 8, alpha 16, dropout 0.05 on every projection; distillation: KL to the "
        "dense model's logits at temperature 1 over every real token (kd_alpha 1: no cross-entropy term), the "
        "teacher running without gradients. Tune time: wall minutes of `fxprune tune` (loading, training, merging) "
        "with the 1-minute load average at its start and end (2 cores). Zero-shot: lm-eval-harness formats and "
        f"scoring on the first {a.limit} examples of each task; acc for BoolQ, PIQA, WinoGrande, ARC-e, acc_norm for "
        "HellaSwag, ARC-c, OBQA (as the seeds report them), ± the sample standard error of the mean; the mean "
        "column averages the seven with the standard error of that average.", "",
        md_table(["model", "parameters", *ppl_cols, "tune min", *TASKS, "mean"], rows), ""]
    (OUT / f"{a.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
