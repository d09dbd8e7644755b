"""Issue 15: a pruned SmolLM2 exported to every format that can express its plan, each format's
perplexity on the first --eval-tokens WikiText-2 test tokens (--window-token windows) against the
pruned GraphModule's. Formats: hf (transformers), pt2 (torch.export program), aoti (the same
program as an AOTInductor package), gguf (llama.cpp through
llama-cpp-python, the optional `llamacpp` extra), and a uniform-widths plan (PruneConfig(uniform_widths=True),
the library's importance unless `--uniform-importance`, no protected layers) exported to hf (and to gguf,
as llama.cpp's `llama` architecture, when gguf is among --formats). A format that refuses the plan is
recorded with its error.

Usage: PYTHONPATH=. FXPRUNE_DATA_DIR=../shared/data python -m benchmarks.export_check --pruned DIR --work WORKDIR
(DIR from `python -m fxprune.cli prune --output DIR`, default settings).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from benchmarks.common import RESULTS, data_dir, finish, header, log, md_table, report_head, write_json


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pruned", default=None, help="fxprune directory saved by `fxprune prune` (not needed for "
                                                   "--formats uniform alone)")
    p.add_argument("--work", required=True, help="scratch folder for the exported files (emptied first)")
    p.add_argument("--formats", nargs="+", default=["hf", "pt2", "gguf", "uniform"],
                   choices=["hf", "pt2", "aoti", "gguf", "uniform"], help="aoti: the pt2 program compiled by "
                   "AOTInductor (minutes), loaded with torch._inductor.aoti_load_package")
    p.add_argument("--gguf-dtype", default="f32", choices=["f32", "f16"])
    # The library default (hywia): l2 without protected layers breaks the model (export_smollm2_uniform.md),
    # and a broken model says little about an export.
    p.add_argument("--uniform-importance", default=None, help="importance of the uniform-widths plan "
                                                              "(default: the library's)")
    p.add_argument("--ratio", type=float, default=0.2, help="ratio of the uniform-widths plan")
    p.add_argument("--eval-tokens", type=int, default=10240)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=str(RESULTS / "export_smollm2"))
    return p.parse_args(argv)


class LogitsOf:
    """`model(ids, attention_mask=...).logits` for a callable that returns the logits tensor."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, ids, attention_mask=None):
        return SimpleNamespace(logits=self.fn(ids, attention_mask))


def llama_cpp_logits(path, n_ctx, threads):
    """Row by row through llama.cpp (one sequence at a time, cache reset between rows)."""
    import llama_cpp
    import numpy as np
    import torch
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                          n_threads=threads)

    def run(ids, mask):
        rows = []
        for row in ids.tolist():
            llm.reset()
            llm.eval(row)
            rows.append(torch.from_numpy(np.array(llm.scores[: len(row)], dtype=np.float32)))
        return torch.stack(rows)
    return run


def measure(name, model, tok, args, rows, reference=None, note=""):
    from fxprune.evaluation.evaluate import perplexity
    t0 = time.time()
    ppl = perplexity(model, tok, data_dir(args.data_dir) / "wikitext-2-raw" / "wiki.test.raw", window=args.window,
                     max_tokens=args.eval_tokens)
    diff = None if reference is None else 100 * (ppl / reference - 1)
    rows.append({"model": name, "ppl": ppl, "diff_pct": diff, "seconds": time.time() - t0, "note": note})
    log(name, f"ppl {ppl:.4f}", "" if diff is None else f"({diff:+.4f}%)")
    return ppl


def run_formats(gm, tok, args, work, reference, rows, label, formats):
    """Each of `formats` of one plan: exported, loaded the way its users load it, evaluated."""
    import torch
    import fxprune
    work.mkdir(parents=True, exist_ok=True)
    for fmt in formats:
        try:
            if fmt == "hf":
                from transformers import AutoModelForCausalLM
                fxprune.export_hf(gm, work / "hf", tokenizer=tok)
                model = AutoModelForCausalLM.from_pretrained(work / "hf").eval()
            elif fmt == "pt2":
                fxprune.export_program(gm, work / "model.pt2")
                model = LogitsOf(torch.export.load(work / "model.pt2").module())
            elif fmt == "aoti":
                path = fxprune.export_program(gm, work / "model-aoti.pt2", aoti=True)
                model = LogitsOf(torch._inductor.aoti_load_package(str(path)))
            else:
                from fxprune.data.models import embedded_gguf
                path = fxprune.export_gguf(gm, work / f"model-{args.gguf_dtype}.gguf", dtype=args.gguf_dtype,
                                           tokenizer_gguf=embedded_gguf())
                model = LogitsOf(llama_cpp_logits(path, args.window, args.threads))
        except fxprune.ExportError as exc:
            rows.append({"model": f"{label} -> {fmt}", "ppl": None, "diff_pct": None, "seconds": 0,
                         "note": "refused: " + str(exc).replace("\n", " ")})
            log(fmt, "refused:", str(exc).splitlines()[0])
            continue
        with torch.no_grad():
            measure(f"{label} -> {fmt}", model, tok, args, rows, reference)


def run_uniform(tok, args, work, rows):
    """The uniform-widths plan, which a Hugging Face config can hold, to hf (and gguf as `llama`)."""
    import torch
    import fxprune
    from fxprune.data.models import load_model
    model, own_tok = load_model()
    tok = tok or own_tok
    options = {"importance": args.uniform_importance} if args.uniform_importance else {}
    gm = fxprune.compile(model, args.ratio, uniform_widths=True, **options)
    plan = gm.meta[fxprune.PLAN_KEY]
    note = f"ratio {args.ratio}, {plan.config.importance}, removed {plan.removed_fraction:.4f}"
    with torch.no_grad():
        reference = measure("uniform-widths plan (GraphModule)", gm, tok, args, rows, note=note)
    run_formats(gm, tok, args, work / "uniform", reference, rows, "uniform-widths plan",
                ["hf"] + (["gguf"] if "gguf" in args.formats else []))


def main(argv=None):
    args = parse(argv)
    import torch
    import fxprune
    from transformers import AutoTokenizer
    torch.set_num_threads(args.threads)
    report = header(args.threads)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = []
    if args.pruned:
        tok = AutoTokenizer.from_pretrained(args.pruned)
        gm = fxprune.load(args.pruned)
        plan = gm.meta[fxprune.PLAN_KEY]
        with torch.no_grad():
            reference = measure("default plan (GraphModule, fxprune.load)", gm, tok, args, rows,
                                note=f"{plan.config.importance}, removed {plan.removed_fraction:.4f}")
        run_formats(gm, tok, args, work / "default", reference, rows, "default plan",
                    [f for f in args.formats if f != "uniform"])
    else:
        tok = None  # the uniform run loads the model with its tokenizer
    if "uniform" in args.formats:
        run_uniform(tok, args, work, rows)
    report.update(rows=rows, eval_tokens=args.eval_tokens, window=args.window, pruned=args.pruned)
    finish(report)
    out = Path(args.out)
    write_json(out.with_suffix(".json"), report)
    table = md_table(["model", "WikiText-2 ppl", "vs its GraphModule", "eval s", "note"],
                     [[r["model"], "-" if r["ppl"] is None else f"{r['ppl']:.4f}",
                       "-" if r["diff_pct"] is None else f"{r['diff_pct']:+.4f}%", f"{r['seconds']:.0f}", r["note"]]
                      for r in rows])
    lines = report_head("Pruned SmolLM2-135M-Instruct exported to standard formats", report)
    lines += [f"First {args.eval_tokens} WikiText-2 test tokens, {args.window}-token windows "
              f"(`fxprune.evaluation.evaluate.perplexity`). Each export is loaded the way its users load it: "
              "`AutoModelForCausalLM.from_pretrained`, `torch.export.load(...).module()`, "
              "`torch._inductor.aoti_load_package`, "
              f"`llama_cpp.Llama` (GGUF {args.gguf_dtype}).", "", table, ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
