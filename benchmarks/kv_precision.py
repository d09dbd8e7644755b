"""Where the KV-cache logits of SmolLM2 differ from the recompute path's (issue 14's 1e-4 relative oracle).

Relative error = max |a - b| / max |b| over the per-step logits of `--new` greedy steps (tests/oracles.rel_err),
prompt "The capital of France is". Measured for:
- Hugging Face's own caches (DynamicCache, StaticCache) against the dense model re-run on the whole sequence:
  what any fp32 KV cache costs, independent of fxprune;
- fxprune's KV-cache program of a pruned model (l2, 0.5, round_to 64, the slow test's) against its recompute,
  with cache lengths from the exact one (prompt + new) to 256 masked slots, in float32 and float64.

    PYTHONPATH=. python -m benchmarks.kv_precision
"""
from __future__ import annotations

import argparse

from benchmarks.common import RESULTS, finish, header, log, md_table, report_head, write_json

PROMPT = "The capital of France is"


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def recompute(gm, ids, n):
    """Per-step logits re-running the whole sequence (greedy), and the tokens."""
    import torch
    steps = []
    with torch.no_grad():
        for _ in range(n):
            step = gm(ids).logits[:, -1]
            steps.append(step)
            ids = torch.cat([ids, step.argmax(-1, keepdim=True)], 1)
    return ids, torch.stack(steps, 1)


def hf_cached(model, ids, n, **kwargs):
    import torch
    model.generation_config.eos_token_id = None
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.logits, 1)


def keep_everything(model):
    """fxprune.apply with a plan that removes nothing (the dense model through fxprune's programs)."""
    import fxprune
    from fxprune.planning.plan import PrunePlan
    dg = fxprune.analyze(model)
    return fxprune.apply(model, PrunePlan.keep_all(dg), dg=dg)


def program_rows(gm, what, ids, n, dtype_name, lengths):
    from fxprune.serving.generation import Generator
    ref_ids, ref = recompute(gm, ids, n)
    rows = []
    for length in lengths:
        out, logits = Generator(gm, cache_block=length).generate(ids, max_new_tokens=n, return_logits=True)
        rows.append({"what": what, "dtype": dtype_name,
                     "cache_len": -(-(ids.shape[1] + n) // length) * length, "tokens_equal": bool((out == ref_ids).all()),
                     "rel_err": rel_err(logits.to(ref.dtype), ref)})
        log(rows[-1])
    return rows


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads (GEMM splits depend on it)")
    p.add_argument("--fp32-only", action="store_true", help="skip the float64 rows")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    import fxprune
    from fxprune.data.models import load_model
    dest = RESULTS / ("kv_precision" if args.threads == 1 else f"kv_precision_{args.threads}threads")
    report = {**header(args.threads), "new": args.new, "prompt": PROMPT, "rows": []}
    model, tok = load_model()
    with torch.inference_mode():
        ids = tok(PROMPT, return_tensors="pt")["input_ids"]
        ref_ids, ref = recompute(model, ids, args.new)
        for name, kw in (("Hugging Face generate, DynamicCache", {}),
                         ("Hugging Face generate, StaticCache", {"cache_implementation": "static"})):
            out, logits = hf_cached(model, ids, args.new, **kw)
            report["rows"].append({"what": name + ", dense", "dtype": "float32", "cache_len": None,
                                   "tokens_equal": bool((out == ref_ids).all()), "rel_err": rel_err(logits, ref)})
            log(report["rows"][-1])
    exact = ids.shape[1] + args.new
    report["rows"] += program_rows(keep_everything(model), "fxprune KV program, nothing removed", ids, args.new,
                                   "float32", [exact, 64])
    pruned = "fxprune KV program, pruned 50% (l2, round_to 64)"
    report["rows"] += program_rows(fxprune.compile(model, 0.5, importance="l2", round_to=64), pruned, ids, args.new,
                                   "float32", [exact, 64, 256])
    write_json(dest.with_suffix(".json"), report)
    if not args.fp32_only:
        model64, _ = load_model(dtype=torch.float64)
        report["rows"] += program_rows(fxprune.compile(model64, 0.5, importance="l2", round_to=64), pruned, ids,
                                       args.new, "float64", [exact, 64, 256])
    finish(report)
    write_json(dest.with_suffix(".json"), report)
    rows = [[r["what"], r["dtype"], r["cache_len"] or "-", r["tokens_equal"], f"{r['rel_err']:.2e}"]
            for r in report["rows"]]
    lines = report_head("KV-cache logits against the recompute path, SmolLM2-135M (issue 14)", report)
    lines += [f"Prompt {PROMPT!r}, {args.new} greedy steps; relative error = max |KV-cache logit - recompute "
              "logit| / max |recompute logit| over all steps (tests/oracles.rel_err). Cache length: the static "
              "cache's slots (those past the current position masked).", "",
              md_table(["path", "dtype", "cache length", "tokens equal", "rel. error"], rows), ""]
    dest.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
