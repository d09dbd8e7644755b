"""A checkpoint pruned layer by layer (`fxprune.prune_checkpoint`) against the same prune in memory.

SmolLM2-135M-Instruct is written as a safetensors checkpoint to a temporary directory; each run is a child
process (so its peak resident memory, VmHWM, is its own): streamed with `max_memory`, and in memory
(`fxprune.compile`, same importance, calibration and `reconstruct="none"`). Both outputs are compared tensor by
tensor. Writes benchmarks/results/streaming_<date>.md/.json.

    PYTHONPATH=. python -m benchmarks.streaming_smollm2 [--importance flap] [--max-memory 1GB]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import RESULTS, finish, header, md_table, report_head, write_json

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(2)
def peak_gb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1e6
import fxprune
from fxprune.data.calibration import Calibration
from transformers import AutoTokenizer
ckpt, mode, out, importance, budget = sys.argv[1:6]
ids = Calibration.packaged(AutoTokenizer.from_pretrained(ckpt), 8, 128, 0)
start, before = time.time(), peak_gb()
if mode == "stream":
    plan = fxprune.prune_checkpoint(ckpt, 0.2, out, importance=importance, calibration=ids, max_memory=budget)
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    gm = fxprune.compile(model, 0.2, importance=importance, reconstruct="none", calibration=ids)
    fxprune.save(gm, out)
    plan = gm.meta[fxprune.PLAN_KEY]
print(json.dumps({"wall_s": time.time() - start, "peak_gb": peak_gb(), "imports_gb": before,
                  "params_after": plan.params_after}))
"""


def child(ckpt, mode, out, importance, budget) -> dict:
    run = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), mode, str(out), importance, budget],
                         capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def same_tensors(a: Path, b: Path) -> bool:
    from fxprune.serialization import read_weights
    x, y = read_weights(a), read_weights(b)
    return x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--importance", default="flap")
    p.add_argument("--max-memory", default="1GB")
    args = p.parse_args(argv)
    from fxprune.data import load_model
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "smollm2"
        model, tok = load_model()
        model.save_pretrained(ckpt)
        tok.save_pretrained(ckpt)
        del model
        rows = {mode: child(ckpt, mode, Path(tmp) / mode, args.importance, args.max_memory)
                for mode in ("stream", "memory")}
        equal = same_tensors(Path(tmp) / "stream", Path(tmp) / "memory")
    report = {**header(), "importance": args.importance, "max_memory": args.max_memory, "runs": rows,
              "identical_tensors": equal}
    finish(report)
    date = report["date"][:10]
    write_json(RESULTS / f"streaming_{date}.json", report)
    lines = report_head("SmolLM2-135M-Instruct pruned from its checkpoint, streamed and in memory", report)
    lines += [f"20%, importance {args.importance}, reconstruct none, 8 x 128 packaged C4 tokens; streamed with "
              f"max_memory={args.max_memory}. Peak: VmHWM of the child process. Outputs identical tensor by tensor: "
              f"{equal}.", "",
              md_table(["run", "parameters after", "wall s", "peak RSS GB", "after imports GB"],
                       [[m, f"{r['params_after']:,}", f"{r['wall_s']:.1f}", f"{r['peak_gb']:.2f}",
                         f"{r['imports_gb']:.2f}"] for m, r in rows.items()]), ""]
    (RESULTS / f"streaming_{date}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
