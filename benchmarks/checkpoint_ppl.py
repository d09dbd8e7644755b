"""WikiText-2 perplexity of the intermediate checkpoints of a full-weight `fxprune tune` run, with the
training minutes it took to reach each (from the run's log), so a recovery curve needs no extra training.

    PYTHONPATH=. python -m benchmarks.checkpoint_ppl --pruned out/e2e/r20/pruned \
        --checkpoints out/e2e/r20/kd_full_ckpt --log out/e2e.log --name e2e_checkpoints
"""
from __future__ import annotations

import argparse
import json
import re
from datetime import datetime
from pathlib import Path

import torch

from benchmarks.common import RESULTS, data_dir, finish, header, md_table, report_head, write_json

STEP_LINE = re.compile(r"^(\S+ \S+),\d+ fxprune\.lora: (?:step (\d+)/\d+|all weights|LoRA r=)")


def step_times(log: Path) -> dict[int, float]:
    """Minutes from the start of training (the line announcing the trainable weights) to each logged step."""
    start, times = None, {}
    for line in log.read_text(errors="replace").splitlines():
        m = STEP_LINE.match(line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")
        if m.group(2) is None:
            start, times = t, {}
        elif start is not None:
            times[int(m.group(2))] = (t - start).total_seconds() / 60
    return times


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--pruned", required=True, help="the pruned directory the run trained (fxprune.save)")
    p.add_argument("--checkpoints", required=True, help="the run's --output-dir (checkpoint-N folders)")
    p.add_argument("--log", required=True, help="the run's log, for the time to each step")
    p.add_argument("--eval-tokens", type=int, default=10240)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="checkpoint_ppl")
    p.add_argument("--data-dir", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    import fxprune
    from fxprune.evaluation.evaluate import perplexity
    wiki = data_dir(a.data_dir) / "wikitext-2-raw" / "wiki.test.raw"
    folders = sorted(Path(a.checkpoints).glob("checkpoint-*"), key=lambda d: int(d.name.split("-")[1]))
    if not folders:
        raise FileNotFoundError(f"no checkpoint-N folder in {a.checkpoints} (set by --checkpoints)")
    minutes = step_times(Path(a.log))
    tok = AutoTokenizer.from_pretrained(a.pruned)
    report = {**header(a.threads), "pruned": a.pruned, "checkpoints": a.checkpoints, "rows": []}
    for folder in folders:
        gm = fxprune.load(a.pruned)
        state = load_file(str(folder / "model.safetensors"))
        missing, unexpected = gm.load_state_dict(state, strict=False)
        current = gm.state_dict()
        loaded = {current[k].data_ptr() for k in state}
        tied = {k for k in missing if current[k].data_ptr() in loaded}  # a tied head shares a loaded tensor
        if unexpected or set(missing) - tied:
            raise ValueError(f"{folder}: weights do not match the pruned graph (missing {sorted(set(missing) - tied)}, "
                             f"unexpected {unexpected})")
        step = int(folder.name.split("-")[1])
        ppl = perplexity(gm, tok, wiki, max_tokens=a.eval_tokens)
        report["rows"].append({"step": step, "train_min": minutes.get(step), "ppl": ppl})
    finish(report)
    out = RESULTS / a.name
    write_json(out.with_suffix(".json"), report)
    rows = [[r["step"], "-" if r["train_min"] is None else f"{r['train_min']:.1f}", f"{r['ppl']:.2f}"]
            for r in report["rows"]]
    lines = report_head("Perplexity along a recovery run's checkpoints", report) + [
        f"Pruned model `{a.pruned}`, checkpoints `{a.checkpoints}`; WikiText-2 perplexity on the first "
        f"{a.eval_tokens:,} tokens (128-token windows). Training minutes: from the line announcing the trainable "
        "weights to the step's log line (loading and merging not included).", "",
        md_table(["step", "training min", "WikiText-2 ppl"], rows), ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
