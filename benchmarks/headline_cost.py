"""The headline call's own cost: `fxprune.compile(model, ratio)` on SmolLM2, one child process per run.

Each run is its own process with `--threads` torch threads; it reports the compile wall time, the peak resident
memory (VmHWM, reset once the model is loaded: the call's own peak with the model resident), the parameter count,
the plan's kept units and the WikiText-2 perplexity. `--code OLD_DIR` runs a second copy of the package (another
checkout's root) back to back with this one, in the same conditions, for an old-versus-new comparison.

    PYTHONPATH=. FXPRUNE_DATA_DIR=... python -m benchmarks.headline_cost --seeds 0 1 --code /tmp/old
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.common import RESULTS, data_dir, load_average, write_json

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
import fxprune
from fxprune.data.models import load_model
from fxprune.evaluation.evaluate import perplexity

def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1e6

ratio, seed, wiki, tokens = float(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
model, tok = load_model()
loaded = hwm()
with open("/proc/self/clear_refs", "w") as f:  # the call's own peak from here: loading the GGUF peaks higher
    f.write("5")
resident = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1e6
t0 = time.perf_counter()
gm = fxprune.compile(model, ratio=ratio, seed=seed)
wall = time.perf_counter() - t0
peak = hwm()
plan = gm.meta[fxprune.PLAN_KEY]
ppl = perplexity(gm, tok, wiki, max_tokens=tokens)
print(json.dumps({"file": fxprune.__file__, "wall_s": wall, "peak_gb": peak, "load_peak_gb": loaded, "resident_before_gb": resident,
                  "params_after": plan.params_after, "params_before": plan.params_before, "ppl": ppl,
                  "units": {str(k): list(v) for k, v in plan.units.items()}}))
"""


def run_one(root: str, ratio: float, seed: int, threads: int, wiki: Path, tokens: int) -> dict:
    """One compile in a fresh process whose package is `root`'s fxprune."""
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    load = load_average()
    out = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(ratio), str(seed), str(wiki), str(tokens)],
                         env=env, cwd=root, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"run in {root} failed:\n{out.stderr[-4000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    return {**row, "root": root, "seed": seed, "ratio": ratio, "load_start": load, "load_end": load_average()}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-tokens", type=int, default=10240)
    p.add_argument("--code", default=None, help="root of a second checkout to run back to back (old)")
    p.add_argument("--out", default="headline_cost.json")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    wiki = data_dir(args.data_dir) / "wikitext-2-raw" / "wiki.test.raw"
    new = str(Path(__file__).resolve().parent.parent)
    roots = [("old", args.code), ("new", new)] if args.code else [("new", new)]
    rows = []
    for seed in args.seeds:
        for label, root in roots:
            row = {"code": label, **run_one(root, args.ratio, seed, args.threads, wiki, args.eval_tokens)}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "units"}), flush=True)
    write_json(RESULTS / args.out, {"threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()
