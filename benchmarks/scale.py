"""Pruning checkpoints larger than memory: seeded random LLaMA-2-7B- and 13B-shaped checkpoints (bfloat16,
written shard by shard to a temporary directory, deleted after) pruned by 20% streamed, one child process per
run, against a dry-run estimate made first; and the dry run of a 70B shape from its config and first layer.
Random weights make quality meaningless; time, memory, bytes read and the plan's counts are not.

    PYTHONPATH=. python -m benchmarks.scale [--runs 7b:flap:bias 7b:element1:none 13b:flap:bias] [--max-memory 3GB]

Writes benchmarks/results/scale_<date>.md/.json/.png.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, finish, header, md_table, report_head, write_json
from benchmarks.synthetic import SHAPES, llama_config, write_random_checkpoint

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(2)
import fxprune
from fxprune.streaming import CheckpointWeights
from fxprune.util.memory import reset_resident_peak, resident_peak
ckpt, out, importance, refit, budget, tokens = sys.argv[1:7]
rows, length = map(int, tokens.split("x"))
read = {"bytes": 0}
original = CheckpointWeights._read
def counted(self, name):
    t = original(self, name)
    read["bytes"] += t.numel() * t.element_size()
    return t
CheckpointWeights._read = counted
ids = torch.randint(1, 32000, (rows, length), generator=torch.Generator().manual_seed(0))
options = dict(importance=importance, reconstruct=refit, calibration=ids, max_memory=budget)
start = time.time()
estimate = fxprune.estimate_checkpoint(ckpt, 0.2, **options)
dry = {"seconds": time.time() - start, "estimate_s": estimate.seconds, "peak_bytes": estimate.peak_bytes,
       "lines": estimate.lines()}
read["bytes"] = 0
marks = []
reset_resident_peak()
start = time.time()
plan = fxprune.prune_checkpoint(ckpt, 0.2, out, progress=lambda stage, s, n: marks.append((stage, time.time() - start)),
                                **options)
print(json.dumps({"wall_s": time.time() - start, "peak_bytes": resident_peak(), "read_bytes": read["bytes"],
                  "params_before": plan.params_before, "params_after": plan.params_after, "marks": marks,
                  "dry_run": dry}))
"""
DRY = r"""
import json, sys, torch
torch.set_num_threads(2)
import fxprune
ids = torch.randint(1, 32000, (8, 128), generator=torch.Generator().manual_seed(0))
estimate = fxprune.estimate_checkpoint(sys.argv[1], 0.2, importance=sys.argv[2], reconstruct=sys.argv[3],
                                       calibration=ids, max_memory=sys.argv[4])
print(json.dumps({"lines": estimate.lines(), "estimate_s": estimate.seconds, "peak_bytes": estimate.peak_bytes}))
"""


def child(code: str, *args) -> dict:
    run = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"child failed ({args}):\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def sweep_seconds(marks) -> dict[str, float]:
    """Seconds of each sweep from the progress marks (the first from the prune's start: capture included)."""
    out, end = {}, 0.0
    for stage in dict.fromkeys(s for s, _ in marks):
        last = max(t for s, t in marks if s == stage)
        out[stage], end = last - end, last
    return out


def plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in sorted({r["run"] for r in rows}):
        pts = sorted((r["checkpoint_gb"], r["peak_gb"]) for r in rows if r["run"] == run)
        ax.plot(*zip(*pts), "o-", label=f"streamed, {run}")
    sizes = sorted({r["checkpoint_gb"] for r in rows})
    ax.plot(sizes, sizes, "k--", label="the checkpoint's size")
    ax.axhline(24, color="grey", lw=0.8)
    ax.text(sizes[0], 24.3, "this machine's RAM", fontsize=8)
    ax.set_xlabel("checkpoint (GB, bfloat16)")
    ax.set_ylabel("peak resident memory (GB)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--runs", nargs="+", default=["7b:flap:bias", "7b:element1:none", "13b:flap:bias"],
                   help="shape:importance:reconstruct (shapes: 7b, 13b)")
    p.add_argument("--max-memory", default="3GB")
    p.add_argument("--tokens", default="8x128", help="calibration rows x tokens")
    p.add_argument("--layers", type=int, default=None, help="fewer decoder layers (a quick check of the script)")
    p.add_argument("--tmp", default=None, help="where checkpoints are written (deleted after)")
    p.add_argument("--from-partial", action="store_true",
                   help="no new run: the report of the runs an interrupted sweep left in scale_partial.json")
    args = p.parse_args(argv)
    report = {**header(threads=2), "max_memory": args.max_memory, "tokens": args.tokens, "runs": []}
    if args.from_partial:
        report = json.loads((RESULTS / "scale_partial.json").read_text())
        args.runs = []
    extra = {} if args.layers is None else {"num_hidden_layers": args.layers}
    runs: dict[str, list[str]] = {}
    for spec in args.runs:
        shape, run = spec.split(":", 1)
        if shape not in SHAPES or shape == "70b":
            raise SystemExit(f"--runs {spec!r}: the shape must be one of 7b, 13b")
        runs.setdefault(shape, []).append(run)
    for shape, shape_runs in runs.items():
        folder = Path(tempfile.mkdtemp(prefix=f"fxprune-scale-{shape}-", dir=args.tmp))
        try:
            start = time.time()
            sizes = write_random_checkpoint(folder / "ckpt", llama_config(shape, **extra))
            written = time.time() - start
            for run in shape_runs:
                importance, refit = run.split(":")
                result = child(CHILD, folder / "ckpt", folder / "out", importance, refit, args.max_memory, args.tokens)
                out_bytes = sum(f.stat().st_size for f in (folder / "out").glob("*.safetensors"))
                shutil.rmtree(folder / "out")
                report["runs"].append({"shape": shape, "run": run, "checkpoint_gb": sum(sizes.values()) / 1e9,
                                       "write_checkpoint_s": written, "output_gb": out_bytes / 1e9,
                                       "peak_gb": result["peak_bytes"] / 1e9, "read_gb": result["read_bytes"] / 1e9,
                                       "sweep_s": sweep_seconds(result["marks"]), **result})
                write_json(RESULTS / "scale_partial.json", report)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix="fxprune-scale-70b-", dir=args.tmp))
    try:
        write_random_checkpoint(folder, llama_config("70b"), layers=1)
        report["dry_run_70b"] = child(DRY, folder, "flap", "bias", args.max_memory)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    finish(report)
    date = report["date"][:10]
    write_json(RESULTS / f"scale_{date}.json", report)
    plot(report["runs"], RESULTS / f"scale_{date}.png")
    lines = report_head("Checkpoints larger than memory, pruned streamed", report)
    lines += [f"Seeded random LLaMA-2-shaped checkpoints in bfloat16, pruned by 20% with `fxprune.prune_checkpoint`"
              f" (max_memory={args.max_memory}, {args.tokens} random calibration tokens, two threads), one child "
              "process per run; peak = VmHWM of the child from the start of the prune; read = bytes of the tensors "
              "read from the shards; estimate = the dry run made first in the same child.", "",
              md_table(["shape", "importance:refit", "checkpoint GB", "params after", "wall", "estimate",
                        "peak RSS GB", "read GB", "output GB", "sweeps (s)"],
                       [[r["shape"], r["run"], f"{r['checkpoint_gb']:.1f}", f"{r['params_after']:,}",
                         f"{r['wall_s'] / 60:.1f} min", f"{r['dry_run']['estimate_s'] / 60:.1f} min",
                         f"{r['peak_gb']:.2f}", f"{r['read_gb']:.1f}", f"{r['output_gb']:.1f}",
                         ", ".join(f"{k} {v:.0f}" for k, v in r["sweep_s"].items())] for r in report["runs"]]), "",
              "Dry run of a LLaMA-2-70B shape (config + embedding + first layer written, flap:bias):", "",
              md_table(["", ""], report["dry_run_70b"]["lines"]), "", f"![peak memory](scale_{date}.png)", ""]
    (RESULTS / f"scale_{date}.md").write_text("\n".join(lines))
    (RESULTS / "scale_partial.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
