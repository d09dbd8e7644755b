"""Command line: `fxprune inspect`, `fxprune prune`, `fxprune eval`, `fxprune tune`, `fxprune export`."""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

from fxprune.analysis.capture import CaptureError
from fxprune.planning.config import ALLOCATIONS, TARGETS
from fxprune.reconstruction.settings import MODES as REFIT_MODES, PRECISIONS as REFIT_PRECISIONS
from fxprune.evaluation.tasks import TASKS

DEFAULT_EVAL_TASKS = ("ppl", *TASKS)


def peak_gb() -> float:
    """Peak resident memory of this process so far, in GB (Linux reports `ru_maxrss` in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def table(rows) -> str:
    """`rows` of (label, value) as aligned two-column text."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def cmd_inspect(args) -> int:
    """`fxprune inspect`: print a model's group table, and optionally write its Graphviz file or one layer's
    picture. Returns the exit code."""
    from fxprune.analysis.analyze import analyze
    from fxprune.data.models import load_model
    model, _ = load_model(args.model, tokenizer=False)
    dg = analyze(model)
    print(dg.summary())
    if args.dot:
        Path(args.dot).write_text(dg.to_dot())
    if args.png:
        dg.draw(args.png, layer=args.layer)
    return 0


def cmd_prune(args) -> int:
    """`fxprune prune`: check the settings and data files, load the model, prune it, print perplexity before and
    after with the counts, time and memory, and save to `--output`. Returns the exit code."""
    import fxprune
    from fxprune.data.calibration import Calibration
    from fxprune.data.models import load_model
    from fxprune.data.sources import calibration_source, wikitext_source
    from fxprune.cli.streamed import dry_run, prune_streamed, streamed_size, streaming_defaults
    from fxprune.util.distributed import init_from_env, on_rank_zero
    init_from_env()  # under torchrun: the ranks split the calibration batches (docs/distributed.md)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    if args.dry_run:
        return report(dry_run(args, prune_config(streaming_defaults(args))), args)
    size = streamed_size(args.model, args.max_memory)
    if size is not None:
        return report(prune_streamed(args, prune_config(streaming_defaults(args)), size) +
                      [("peak memory", f"{peak_gb():.2f} GB")], args)
    cfg = prune_config(args)  # bad settings fail here, before any data or model is read
    t0 = time.time()
    # Every data file is found (or refused, naming its flag) before the model is loaded.
    calib_src = calibration_source(args.calib_data, args.data_dir)
    wiki = wikitext_source(args.eval_data, args.data_dir) if args.eval_tokens else None
    if wiki is not None and wiki.skip:
        print(f"fxprune prune: perplexity skipped: {wiki.skip}", file=sys.stderr)
    wiki = wiki.value if wiki is not None and not wiki.skip else None
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    calib = Calibration.from_text(tok, calib_src.value, n=args.calib_samples, seq_len=args.calib_len)
    rows = [("calibration", calib_src.origin)]
    ppl_before = evaluate_ppl(model, tok, wiki, args) if wiki is not None else None
    t1 = time.time()
    refit = Calibration.from_text(tok, calib_src.value, n=cfg.reconstruct.samples,
                                  seq_len=args.calib_len) if cfg.reconstruct.enabled else None
    gm = fxprune.compile(model, config=cfg, calibration=calib, refit_calibration=refit)
    prune_s = time.time() - t1
    ppl_after = evaluate_ppl(gm, tok, wiki, args) if wiki is not None else None
    plan = gm.meta[fxprune.PLAN_KEY]
    if args.output:
        fxprune.save(gm, args.output, base_model=model)
        on_rank_zero(lambda: tok.save_pretrained(args.output))  # so `fxprune tune/eval DIR` find the tokenizer beside the weights
    rows += [("model", args.model or "SmolLM2-135M-Instruct (embedded GGUF)"),
             ("importance", str(plan.config.importance)), ("allocation", plan.config.allocation),
             ("reconstruct", plan.config.reconstruct.mode),
             ("targets", " ".join(args.targets)), ("parameters before", f"{plan.params_before:,}"),
             ("parameters after", f"{plan.params_after:,} (-{plan.removed_fraction:.2%})"),
             (f"wikitext-2 ppl before ({args.eval_tokens} tok, w{args.window})", fmt(ppl_before)),
             (f"wikitext-2 ppl after", fmt(ppl_after)), ("pruning time", f"{prune_s:.1f} s"),
             ("total time", f"{time.time() - t0:.1f} s"), ("peak memory", f"{peak_gb():.2f} GB"),
             ("saved to", args.output or "-")]
    return report(rows, args)


def report(rows, args) -> int:
    """Print the command's report and write it to `--json` when asked (rank 0 only, under torchrun); returns the
    exit code."""
    from fxprune.util.distributed import rank_and_world
    if rank_and_world()[0] != 0:
        return 0
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows), indent=1))
    return 0


def prune_config(args):
    """The library's PruneConfig for the command's flags; a flag left out keeps the library default."""
    import fxprune
    from fxprune.reconstruction.settings import Refit
    options = {}
    if args.importance is not None:
        options["importance"] = args.importance
    refit = {name: value for name, value in (("mode", args.reconstruct), ("samples", args.refit_samples),
                                             ("precision", args.refit_precision)) if value is not None}
    if refit:  # the flags left out keep Refit's defaults
        options["reconstruct"] = Refit(**refit)
    if args.allocation is not None:
        options["allocation"] = args.allocation
    if args.protect is not None:
        options["protect_layers"] = tuple(args.protect) or None
    if args.round_to is not None:
        options["round_to"] = None if args.round_to == "none" else args.round_to
    return fxprune.PruneConfig(ratio=args.ratio, targets=tuple(args.targets), uniform_widths=args.uniform_widths,
                               calibration_samples=args.calib_samples, calibration_len=args.calib_len,
                               batch_size=args.batch, **options)


def round_to_arg(text: str):
    """Parse `--round-to`: "auto", "none" or a positive int."""
    return text if text in ("auto", "none") else int(text)


def fmt(x):
    """A float to two decimals, or "-" for None."""
    return "-" if x is None else f"{x:.2f}"


def evaluate_ppl(model, tok, path, args):
    """WikiText-2 perplexity of `model` on the file `path`, with the CLI's window and token budget."""
    from fxprune.evaluation.evaluate import perplexity
    return perplexity(model, tok, path, window=args.window, max_tokens=args.eval_tokens, progress=True)


def load_any(name, tokenizer=None):
    """(model, tokenizer) from an fxprune directory, a local HF directory, a .gguf file or the default."""
    from fxprune.data.models import load_model
    if name and (Path(name) / "fxprune.json").is_file():
        import fxprune
        from transformers import AutoTokenizer
        return fxprune.load(name), AutoTokenizer.from_pretrained(tokenizer or name)
    return load_model(name)


def eval_sources(args) -> tuple[dict, list[str]]:
    """{task: data path or rows} for `fxprune eval`, and a skip line per task without data. Found before any
    model is loaded: tasks named by --tasks must have their file (FileNotFoundError names the path and the
    flag); those of the default list are skipped when it is missing."""
    from fxprune.data.sources import data_root, wikitext_source
    from fxprune.evaluation.tasks import task_file
    explicit = args.tasks is not None
    tasks = args.tasks if explicit else DEFAULT_EVAL_TASKS
    found, skipped = {}, []
    if "ppl" in tasks:
        wiki = wikitext_source(args.eval_data, args.data_dir)
        found["ppl"] = wiki.value if not wiki.skip else None
        skipped += [f"perplexity skipped: {wiki.skip}"] if wiki.skip else []
    root, flag = data_root(args.data_dir)
    for task in [t for t in tasks if t != "ppl"]:
        if root is None:
            if explicit:
                raise FileNotFoundError(f"{task} needs a data directory holding {task}/: pass --data-dir or set "
                                        "FXPRUNE_DATA_DIR")
            skipped.append(f"{task} skipped: no --data-dir or FXPRUNE_DATA_DIR")
            continue
        try:
            found[task] = task_file(task, root)
        except FileNotFoundError as exc:
            if explicit:
                raise FileNotFoundError(f"{exc} (looked for in the data directory set by {flag})") from None
            skipped.append(f"{task} skipped: {exc}")
    return found, skipped


def cmd_eval(args) -> int:
    """`fxprune eval`: perplexity and the zero-shot tasks of a saved or Hugging Face model, skipping (and saying so)
    what has no data. Returns the exit code."""
    from fxprune.evaluation.evaluate import perplexities, zero_shot
    from fxprune.evaluation.tasks import mean_over_tasks
    sources, skipped = eval_sources(args)
    for line in skipped:
        print(f"fxprune eval: {line}", file=sys.stderr)
    model, tok = load_any(args.model, args.tokenizer)
    rows, report = [], {"model": args.model or "SmolLM2-135M-Instruct (embedded GGUF)", "skipped": skipped}
    t0 = time.time()
    if sources.get("ppl") is not None:
        ppls = perplexities(model, tok, sources["ppl"], args.eval_tokens, window=args.window, progress=True)
        report["wikitext2_ppl"] = ppls[max(ppls)]
        report["wikitext2_ppl_by_tokens"] = ppls
        rows += [(f"wikitext-2 ppl ({n} tok, w{args.window})", f"{v:.2f}") for n, v in ppls.items()]
    tasks = [t for t in sources if t != "ppl"]
    for task in tasks:
        r = zero_shot(model, tok, task, sources[task], limit=args.limit, progress=True)
        report[task] = r
        rows.append((f"{task} acc / acc_norm (n={r['n']})",
                     f"{r['acc']:.4f} ± {r['acc_stderr']:.4f} / {r['acc_norm']:.4f} ± {r['acc_norm_stderr']:.4f}"))
    if tasks:
        report["mean"] = mean_over_tasks(report)
        rows.append((f"mean of {len(tasks)} tasks", f"{report['mean']['value']:.4f} ± {report['mean']['stderr']:.4f}"))
    report.update(parameters=sum(p.numel() for p in set(model.parameters())), time_s=time.time() - t0,
                  peak_gb=peak_gb())
    rows += [("parameters", f"{report['parameters']:,}"),
             ("time", f"{report['time_s']:.1f} s"), ("peak memory", f"{report['peak_gb']:.2f} GB")]
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def cmd_tune(args) -> int:
    """`fxprune tune`: run `fxprune.recovery.tune_script` (LoRA or distillation recovery) on a pruned directory, passing on
    the model's own tokenizer when it has one. Returns the script's exit code."""
    from fxprune.recovery import tune_script
    rest = list(args.rest)
    if "--tokenizer" not in rest and args.model and (Path(args.model) / "tokenizer_config.json").is_file():
        rest += ["--tokenizer", args.model]
    return tune_script.main(["--gm", args.model, *rest]) or 0


def cmd_generate(args) -> int:
    """Text after `--prompt` from a pruned directory: KV-cache generation, or the recompute path."""
    if not args.recompute and args.model and (Path(args.model) / "fxprune.json").is_file():
        # The KV-cache Generator reads the directory itself: no model rebuilt and verified first.
        from transformers import AutoTokenizer
        model, tok = args.model, AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    else:
        model, tok = load_any(args.model, args.tokenizer)
    t0 = time.time()
    if args.recompute:
        from fxprune.evaluation.evaluate import generate
        text = generate(model, tok, args.prompt, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    else:
        from fxprune.serving.generation import Generator
        ids = tok(args.prompt, return_tensors="pt")["input_ids"]
        out = Generator(model).generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                        eos_token_id=tok.eos_token_id, seed=args.seed)
        new = out[0, ids.shape[1]:]
        text = tok.decode(new[new != tok.eos_token_id] if tok.eos_token_id is not None else new,
                          skip_special_tokens=True)
    print(text)
    print(f"[{time.time() - t0:.1f} s, {'recompute' if args.recompute else 'KV cache'}]", file=sys.stderr)
    return 0


def add_generate_parser(sub) -> None:
    """Register the `generate` subcommand on the argparse `sub` parsers."""
    g = sub.add_parser("generate", help="generate text from a pruned directory (KV cache)")
    g.add_argument("model", help="a directory written by fxprune prune / fxprune.save")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--do-sample", action="store_true")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    g.add_argument("--recompute", action="store_true",
                   help="re-run the whole sequence per token (no cache): for families the cache capture refuses")
    g.set_defaults(fn=cmd_generate)


def add_prune_parser(sub) -> None:
    """Register the `prune` subcommand and its options on the argparse `sub` parsers."""
    r = sub.add_parser("prune", help="prune a model, evaluate before/after, save")
    r.add_argument("model", nargs="?", default=None)
    r.add_argument("--ratio", type=float, default=0.2)
    r.add_argument("--importance", default=None, help="importance estimator (default: the library's, hywia)")
    r.add_argument("--reconstruct", default=None, choices=list(REFIT_MODES),
                   help="refit the projections that lost inputs on the calibration text so the residual stream "
                        "matches the dense model's (default: lstsq; none skips it, see docs/reconstruction.md)")
    r.add_argument("--refit-samples", type=int, default=None,
                   help="calibration windows the refit reads (Refit.samples, default: 64); more fit better and cost "
                        "forward passes")
    r.add_argument("--refit-precision", default=None, choices=list(REFIT_PRECISIONS),
                   help="the refit's forward passes in float32 (default) or under bfloat16 autocast: about as good, "
                        "several times faster on a CPU with bfloat16 instructions (docs/reconstruction.md)")
    r.add_argument("--allocation", default=None, choices=list(ALLOCATIONS),
                   help="how widths are shared out between layers (default: uniform; absolute ranks obs's "
                        "errors across layers, see docs/reconstruction.md)")
    r.add_argument("--targets", nargs="+", default=["heads", "mlp"], choices=list(TARGETS),
                   help="structures to prune (experts: whole experts of a routed MoE layer)")
    r.add_argument("--protect", type=int, nargs="*", default=None,
                   help="layers left unpruned (default: auto, the first tenth and last fifteenth; none with "
                        "--uniform-widths); the flag alone protects none")
    r.add_argument("--uniform-widths", action="store_true",
                   help="keep the same widths in every layer (a Hugging Face config can hold the result)")
    r.add_argument("--round-to", type=round_to_arg, default=None,
                   help="MLP widths in multiples of N, 'none', or 'auto' (default: 64 for layers of 512+ channels)")
    r.add_argument("--data-dir", default=None, help="folder with c4/ and wikitext-2-raw/ (or FXPRUNE_DATA_DIR)")
    r.add_argument("--calib-data", default=None,
                   help="calibration texts: a JSON/JSONL {\"text\"} or plain text file, 'packaged' (the C4 sample inside "
                        "fxprune), or hf:NAME[:CONFIG[:SPLIT[:FIELD]]] (Hugging Face datasets); default: <data dir>/c4/c4_sample.json, or the packaged sample without a data dir")
    r.add_argument("--eval-data", default=None,
                   help="WikiText-2 test file; default: <data dir>/wikitext-2-raw/wiki.test.raw, else Hugging Face "
                        "datasets when installed and reachable, else perplexity is skipped")
    r.add_argument("--calib-samples", type=int, default=32)
    r.add_argument("--calib-len", type=int, default=128)
    r.add_argument("--batch", type=int, default=1, help="calibration rows per forward pass of the gradient methods")
    r.add_argument("--eval-tokens", type=int, default=10240)
    r.add_argument("--window", type=int, default=128)
    r.add_argument("--device", default="cpu")
    r.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    r.add_argument("--output", default="out/smollm2-pruned")
    r.add_argument("--max-memory", default=None,
                   help="e.g. 2GB: a safetensors checkpoint directory larger than this is pruned streamed, one layer "
                        "at a time (default importance flap, no refit: --reconstruct lstsq refits it as it is written) "
                        "and written layer by layer")
    r.add_argument("--dry-run", action="store_true",
                   help="checkpoint directory: print the streamed prune's time, memory and disk, measured on its "
                        "first layer, and stop")
    r.add_argument("--json", default=None, help="also write the report as JSON")
    r.set_defaults(fn=cmd_prune)


def main(argv=None) -> int:
    """Entry point of the `fxprune` command: parse `argv` and run the subcommand; returns its exit code."""
    p = argparse.ArgumentParser(prog="fxprune", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("inspect", help="print a model's dependency groups")
    i.add_argument("model", nargs="?", default=None, help="local HF directory or .gguf file (default: embedded SmolLM2)")
    i.add_argument("--dot", help="write the groups as Graphviz DOT")
    i.add_argument("--png", help="write a picture of one layer's groups (PNG or SVG)")
    i.add_argument("--layer", type=int, default=0)
    i.set_defaults(fn=cmd_inspect)
    add_prune_parser(sub)
    e = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a model or pruned directory")
    e.add_argument("model", nargs="?", default=None)
    e.add_argument("--tokenizer", default=None)
    e.add_argument("--tasks", nargs="+", default=None, choices=list(DEFAULT_EVAL_TASKS),
                   help="default: all; those without data are then skipped (named ones must have their file)")
    e.add_argument("--eval-data", default=None, help="WikiText-2 test file (default: <data dir>/wikitext-2-raw/...)")
    e.add_argument("--limit", type=int, default=None, help="first N examples of each zero-shot task")
    e.add_argument("--eval-tokens", type=int, nargs="+", default=[20480],
                   help="perplexity over the first N tokens; several values come from one pass")
    e.add_argument("--window", type=int, default=128)
    e.add_argument("--data-dir", default=None)
    e.add_argument("--json", default=None)
    e.set_defaults(fn=cmd_eval)
    t = sub.add_parser("tune", help="LoRA-tune a pruned directory (options of python -m fxprune.recovery.tune_script)",
                       add_help=False)
    t.add_argument("model")
    t.add_argument("rest", nargs=argparse.REMAINDER)
    t.set_defaults(fn=cmd_tune)
    from fxprune.cli.export import add_parser as add_export_parser
    add_export_parser(sub)
    add_generate_parser(sub)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except (FileNotFoundError, ValueError, CaptureError) as exc:
        print(f"fxprune {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
