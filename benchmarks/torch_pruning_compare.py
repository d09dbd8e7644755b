"""Issue 6: fxprune against Torch-Pruning's LLM recipe on the embedded SmolLM2-135M-Instruct, same parameter count.

fxprune: `fxprune.analyze` (capture + dependency propagation, timed apart), `l2` scoring (data-free, as
Torch-Pruning's magnitude importance), `fxprune.plan`, `fxprune.apply` (rewrite); targets heads + MLP,
protected layers 0, 1, 2, -2, -1.

Torch-Pruning (`pip install --no-deps torch-pruning`): the recipe of its examples/LLMs/prune_llm.py:
`tp.pruner.MetaPruner` with `tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")`, local
(uniform) pruning, `num_heads` of q/k/v, `prune_num_heads=True`, `prune_head_dims=False`, `round_to=4`, one
ratio for heads and channels, then the attention modules' head counts updated. Made comparable to fxprune:
the hidden size is not pruned (o_proj, down_proj and lm_head are ignored as group roots, the recipe prunes
it too), the same layers are protected (ignored), and the ratio is chosen so that the parameter count is
as close as the recipe's granularity allows to fxprune's at each target ratio. With GQA Torch-Pruning
removes query heads, the same number from every KV group, and keeps all KV heads (fxprune removes whole KV
groups); its head ratio is capped at one query head per KV group (with two of three removed, Torch-Pruning
1.6 silently skips the attention group), so at high ratios it removes more MLP channels instead. Its graph tracing needs
eager attention (with sdpa, transformers 5 passes `enable_gqa` to the kernel and Torch-Pruning mis-groups
q and k), so the copy it prunes uses eager attention; perplexity is then measured with sdpa.

Both are evaluated with the same protocol as issue 4 (WikiText-2 test, 128-token windows, first
`--eval-tokens` tokens, no tuning).

Usage: PYTHONPATH=. python -m benchmarks.torch_pruning_compare [--ratios 0.2 0.5] [--eval-tokens 20480]
"""
from __future__ import annotations

import argparse
import importlib.metadata
import copy
import math
import sys
import time
from pathlib import Path

from benchmarks.common import (report_head, RESULTS, Phase, data_dir, finish, header, log, md_table,
                               shared_note, write_json)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    p.add_argument("--eval-tokens", type=int, default=20480)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--protect", type=int, nargs="*", default=[0, 1, 2, -2, -1])
    p.add_argument("--round-to", type=int, default=4, help="Torch-Pruning's round_to (4 in its LLM recipe)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=str(RESULTS / "torch_pruning_compare"), help="output path without extension")
    return p.parse_args(argv)


# -- Torch-Pruning ------------------------------------------------------------------------------------

def tp_layout(model, protect):
    """Per-unit parameter costs of the Llama layers Torch-Pruning may prune (analytic, for choosing a ratio)."""
    cfg = model.config
    layers = model.model.layers
    n = len(layers)
    protected = {i % n for i in protect}
    a = layers[0].self_attn
    head_dim = a.head_dim
    q_head = a.q_proj.weight.shape[1] * head_dim + (head_dim if a.q_proj.bias is not None else 0)
    q_head += a.o_proj.weight.shape[0] * head_dim
    mlp = layers[0].mlp
    channel = mlp.gate_proj.weight.shape[1] + mlp.up_proj.weight.shape[1] + mlp.down_proj.weight.shape[0]
    return {"n_free": n - len(protected), "protected": sorted(protected), "nq": cfg.num_attention_heads,
            "nkv": cfg.num_key_value_heads, "q_head_params": q_head, "inter": mlp.gate_proj.weight.shape[0],
            "channel_params": channel}


def tp_removed(lay, ratio, round_to):
    """Parameters Torch-Pruning's MetaPruner removes at `ratio` (heads and channels), following its rules:
    heads: ceil(ratio * nq) per layer, then ceil(that / nkv) per KV group (GQA); channels: the kept count
    int(inter * (1 - ratio)) rounded down to round_to."""
    hr = head_ratio(lay, ratio)
    per_kv = math.ceil(math.ceil(hr * lay["nq"]) / lay["nkv"]) if hr > 0 else 0
    heads = per_kv * lay["nkv"]
    kept = int(lay["inter"] * (1 - ratio))
    if round_to:
        kept -= kept % round_to
    channels = lay["inter"] - kept
    return lay["n_free"] * (heads * lay["q_head_params"] + channels * lay["channel_params"]), heads, channels


MAX_HEADS_PER_KV_GROUP = 1


def head_ratio(lay, ratio):
    """The recipe's head ratio (= the channel ratio), capped at one query head removed per KV group: with
    two of SmolLM2's three query heads per KV group removed, Torch-Pruning 1.6 drops the attention group
    without a word (its GQA index mapping then reaches every K/V channel and check_pruning_group refuses)."""
    cap = MAX_HEADS_PER_KV_GROUP * lay["nkv"] / lay["nq"] - 1e-6
    return min(ratio, cap)


def choose_ratio(lay, target_removed, round_to):
    """The ratio whose removed count is closest to `target_removed` (bisection, then a local scan)."""
    lo, hi = 0.0, 0.99
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tp_removed(lay, mid, round_to)[0] < target_removed else (lo, mid)
    step = round_to / lay["inter"] if round_to else 1 / lay["inter"]
    cands = [min(max(lo + k * step / 4, 0.0), 0.99) for k in range(-12, 13)]
    return min(cands, key=lambda r: (abs(tp_removed(lay, r, round_to)[0] - target_removed), r))


def tp_prune(model, ex, ratio, lay, protect, round_to):
    import torch_pruning as tp
    layers = model.model.layers
    n = len(layers)
    protected = {i % n for i in protect}
    ignored = [model.lm_head]
    for i, layer in enumerate(layers):
        if i in protected:
            ignored.append(layer)
        else:  # their out channels are the hidden size, which is not pruned here
            ignored += [layer.self_attn.o_proj, layer.mlp.down_proj]
    num_heads = {}
    for layer in layers:
        a = layer.self_attn
        num_heads[a.q_proj] = model.config.num_attention_heads
        num_heads[a.k_proj] = model.config.num_key_value_heads
        num_heads[a.v_proj] = model.config.num_key_value_heads
    with Phase() as build:
        pruner = tp.pruner.MetaPruner(
            model, example_inputs=ex, importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
            global_pruning=False, pruning_ratio=ratio, ignored_layers=ignored, num_heads=num_heads,
            prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=head_ratio(lay, ratio),
            round_to=round_to, forward_fn=lambda m, x: m(x, use_cache=False).logits)
    with Phase() as step:
        for group in pruner.step(interactive=True):
            group.prune()
        # the recipe's attribute update: heads follow q_proj (k/v heads are kept with GQA)
        for layer in layers:
            a = layer.self_attn
            nq = a.q_proj.out_features // a.head_dim
            nkv = a.k_proj.out_features // a.head_dim
            if nq % nkv:
                raise RuntimeError(f"Torch-Pruning left {nq} query heads for {nkv} KV heads")
            a.num_key_value_groups = nq // nkv
    del pruner
    return build, step


def zero_mask_error(model, pruned, vocab) -> float:
    """Relative logit error between Torch-Pruning's model and the dense one with the units it removed
    zeroed at their output projections (the oracle fxprune's tests use): small means its model is a
    correct pruning and its perplexity is its criterion's doing. Removed units are found by matching
    the kept q_proj head blocks and gate_proj rows to the dense model's, bit for bit."""
    import torch
    ref = copy.deepcopy(model)
    hd = model.config.head_dim if getattr(model.config, "head_dim", None) else model.config.hidden_size // model.config.num_attention_heads

    def rows(w, size):
        return {w[i * size:(i + 1) * size].detach().numpy().tobytes(): i for i in range(w.shape[0] // size)}

    with torch.no_grad():
        for a, b, r in zip(model.model.layers, pruned.model.layers, ref.model.layers):
            heads, chans = rows(a.self_attn.q_proj.weight, hd), rows(a.mlp.gate_proj.weight, 1)
            kept_h = {heads[k] for k in rows(b.self_attn.q_proj.weight, hd)}
            kept_c = {chans[k] for k in rows(b.mlp.gate_proj.weight, 1)}
            for h in set(heads.values()) - kept_h:
                r.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
            r.mlp.down_proj.weight[:, sorted(set(chans.values()) - kept_c)] = 0
        ids = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(0))
        x, y = ref(ids, use_cache=False).logits, pruned(ids, use_cache=False).logits
    return float((x - y).norm() / x.norm())


# -- the benchmark ------------------------------------------------------------------------------------

def fmt(x):
    return "–" if x is None else (f"{x:.2f}" if x < 1e4 else f"{x:.3g}")


def render(report):
    s = report["settings"]
    lines = report_head("fxprune vs Torch-Pruning on SmolLM2-135M-Instruct (issue 6)", report) + [
             f"Torch-Pruning {report['tp_version']}, LLM recipe (MetaPruner + GroupMagnitudeImportance(p=2, mean), "
             f"local, heads + MLP channels, round_to={s['round_to']}); fxprune importance l2, uniform allocation. "
             f"Both: heads + MLP, hidden size kept, layers {tuple(s['protect'])} protected. WikiText-2 test, "
             f"{s['window']}-token windows over the first {s['eval_tokens']:,} tokens, no tuning. "
             f"Dense: {report['dense']['params']:,} parameters, perplexity {fmt(report['dense']['ppl'])}.", ""]
    heads = ["target", "tool", "parameters", "removed", "q heads / KV heads (pruned layer)", "MLP width", "ppl",
             "pruning wall s", "peak RSS GB", "peak over RSS before"]
    rows = []
    for r in report["rows"]:
        rows.append([f"{r['target']:g}", r["tool"], f"{r['params']:,}", f"{r['removed_fraction']:.4f}",
                     r["heads"], r["mlp_width"], f"**{fmt(r['ppl'])}**", f"{r['prune_wall_s']:.1f}",
                     f"{r['peak_rss_gb']:.2f}", f"{r['peak_increase_gb']:+.2f}"])
    lines += [md_table(heads, rows), ""]
    checked = [r for r in report["rows"] if "zero_mask_rel_err" in r]
    if checked:
        errs = ", ".join(f"{r['zero_mask_rel_err']:.1e} at {r['target']:g}" for r in checked)
        if all(r["zero_mask_rel_err"] < 1e-4 for r in checked):
            lines += ["Torch-Pruning's pruned models are correct prunings: their logits equal the dense model's with "
                      f"the heads and channels they removed zeroed at o_proj / down_proj (relative error {errs}), so "
                      "their perplexity is the magnitude criterion's doing.", ""]
        else:
            lines += [f"Warning: Torch-Pruning's pruned models differ from the zero-masked dense model (relative error "
                      f"{errs}): its pruning is not a consistent removal here.", ""]
    off = [r for r in report["rows"] if r["tool"] == "torch-pruning" and r["params"] != r["params_predicted"]]
    for r in off:
        lines += [f"Warning: at {r['target']:g} Torch-Pruning left {r['params']:,} parameters where its rules "
                  f"predicted {r['params_predicted']:,}.", ""]
    lines += ["Pruning time by phase (seconds; fxprune's capture and analysis are done once and serve every ratio, "
              "they are counted in each row's pruning wall time above):", ""]
    prow = []
    for r in report["rows"]:
        ph = r["phases"]
        prow.append([f"{r['target']:g}", r["tool"], "; ".join(f"{k} {v['wall_s']:.1f}" for k, v in ph.items())])
    lines += [md_table(["target", "tool", "phases"], prow), ""]
    cost = []
    for t in dict.fromkeys(r["target"] for r in report["rows"]):
        fx = next((r for r in report["rows"] if r["target"] == t and r["tool"] == "fxprune"), None)
        tpr = next((r for r in report["rows"] if r["target"] == t and r["tool"] == "torch-pruning"), None)
        if fx and tpr:
            cost.append([f"{t:g}", f"{fx['prune_wall_s']:.1f}", f"{tpr['prune_wall_s']:.1f}",
                         f"**{fx['prune_wall_s'] / tpr['prune_wall_s']:.2f}**", f"{fx['peak_increase_gb']:+.2f}",
                         f"{tpr['peak_increase_gb']:+.2f}", f"{fx['ppl'] / tpr['ppl']:.3g}"])
    if cost:
        lines += ["Cost ratios (fxprune / Torch-Pruning; fxprune's wall time includes its one-off capture and "
                  "analysis at every ratio):", "",
                  md_table(["target", "fxprune s", "Torch-Pruning s", "time ratio", "fxprune peak over before GB",
                            "Torch-Pruning peak over before GB", "ppl ratio"], cost), ""]
    lines += ["Peak RSS is ru_maxrss reset per phase (the maximum over a row's phases); it counts what was "
              "resident already: the dense model (kept for both tools; Torch-Pruning prunes a deep copy, in place), "
              "and for fxprune the captured graph.", ""]
    return "\n".join(lines)


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    import torch
    torch.set_num_threads(args.threads)
    import torch_pruning as tp
    import fxprune
    from fxprune.planning.config import PruneConfig
    from fxprune.evaluation.evaluate import perplexity
    from fxprune.data.models import load_model
    from fxprune.planning.plan import target_groups
    from fxprune.scoring import score

    analyze_module = sys.modules["fxprune.analysis.analyze"]
    root = data_dir(args.data_dir)
    wiki = root / "wikitext-2-raw" / "wiki.test.raw"
    out = Path(args.out)
    report = header(args.threads)
    report["settings"] = {k: v for k, v in vars(args).items() if k not in ("data_dir", "out")}
    report["tp_version"] = importlib.metadata.version("torch-pruning")
    report["rows"] = []
    protect = tuple(args.protect)

    def ppl(m):
        return perplexity(m, tok, wiki, window=args.window, max_tokens=args.eval_tokens, batch_size=args.eval_batch)

    model, tok = load_model()
    dense_params = sum(p.numel() for p in model.parameters())
    t = time.perf_counter()
    report["dense"] = {"params": dense_params, "ppl": ppl(model), "eval_s": time.perf_counter() - t}
    log(f"dense ppl {report['dense']['ppl']:.3f}")

    # -- fxprune: capture and analysis once (capture timed by wrapping the function analyze calls)
    captured_s = {}
    real_capture = analyze_module.capture

    def timed_capture(*a, **k):
        t0 = time.perf_counter()
        try:
            return real_capture(*a, **k)
        finally:
            captured_s["capture"] = time.perf_counter() - t0

    analyze_module.capture = timed_capture
    try:
        with Phase() as p_an:
            dg = fxprune.analyze(model)
    finally:
        analyze_module.capture = real_capture
    capture_s = captured_s["capture"]
    an_phase = {"capture": {"wall_s": capture_s}, "analysis": {"wall_s": p_an.wall_s - capture_s}}
    log(f"fxprune capture {capture_s:.1f} s, propagation {p_an.wall_s - capture_s:.1f} s")
    fx_after = {}
    for r in args.ratios:
        cfg = PruneConfig(ratio=r, importance="l2", protect_layers=protect)
        with Phase() as p_sc:
            scores = score(dg, target_groups(dg, cfg), method="l2")
        with Phase() as p_pl:
            plan = fxprune.plan(model, r, importance="l2", dg=dg, protect_layers=protect, scores=scores)
        with Phase() as p_ap:
            gm = fxprune.apply(model, plan, dg=dg)
        fx_after[r] = plan.params_after
        shapes = {n: tuple(t.shape) for n, t in gm.named_parameters()}
        q = [v for k, v in shapes.items() if k.endswith("q_proj.weight")]
        kv = [v for k, v in shapes.items() if k.endswith("k_proj.weight")]
        gate = [v for k, v in shapes.items() if k.endswith("gate_proj.weight")]
        hd = model.config.head_dim if getattr(model.config, "head_dim", None) else model.config.hidden_size // model.config.num_attention_heads
        heads = sorted({f"{a[0] // hd}/{b[0] // hd}" for a, b in zip(q, kv)})
        widths = sorted({g[0] for g in gate})
        t = time.perf_counter()
        value = ppl(gm)
        phases = {**an_phase, "scoring (l2)": p_sc.as_dict(), "plan": p_pl.as_dict(), "rewrite": p_ap.as_dict()}
        report["rows"].append({
            "target": r, "tool": "fxprune", "params": plan.params_after, "removed_fraction": plan.removed_fraction,
            "heads": ", ".join(heads), "mlp_width": ", ".join(map(str, widths)), "ppl": value,
            "eval_s": time.perf_counter() - t, "phases": phases,
            "prune_wall_s": p_an.wall_s + p_sc.wall_s + p_pl.wall_s + p_ap.wall_s,
            "peak_rss_gb": max(p_an.peak_gb, p_sc.peak_gb, p_pl.peak_gb, p_ap.peak_gb),
            "peak_increase_gb": max(p.peak_gb - p.rss_before_gb for p in (p_an, p_sc, p_pl, p_ap))})
        log(f"fxprune {r}: ppl {value:.3f}, params {plan.params_after:,}")
        del gm, plan
        write_json(out.with_suffix(".json"), report)

    # -- Torch-Pruning, on a deep copy per ratio
    lay = tp_layout(model, protect)
    ex = tok("Hello world. This is a test.", return_tensors="pt")["input_ids"]
    for r in args.ratios:
        target_removed = dense_params - fx_after[r]
        ratio = choose_ratio(lay, target_removed, args.round_to)
        predicted, n_heads, n_channels = tp_removed(lay, ratio, args.round_to)
        m2 = copy.deepcopy(model)
        m2.set_attn_implementation("eager")
        build, step = tp_prune(m2, ex, ratio, lay, protect, args.round_to)
        m2.set_attn_implementation("sdpa")
        params = sum(p.numel() for p in m2.parameters())
        free = [i for i in range(len(m2.model.layers)) if i not in lay["protected"]]
        a = m2.model.layers[free[0]].self_attn
        hidden_ok = m2.model.embed_tokens.weight.shape[1] == model.config.hidden_size
        oracle = zero_mask_error(model, m2, model.config.vocab_size)
        t = time.perf_counter()
        value = ppl(m2)
        report["rows"].append({
            "target": r, "tool": "torch-pruning", "tp_ratio": ratio, "params": params,
            "params_predicted": dense_params - predicted, "removed_fraction": 1 - params / dense_params,
            "heads": f"{a.q_proj.out_features // a.head_dim}/{a.k_proj.out_features // a.head_dim}",
            "mlp_width": ", ".join(map(str, sorted({m2.model.layers[i].mlp.gate_proj.out_features for i in free}))),
            "hidden_size_kept": hidden_ok, "zero_mask_rel_err": oracle, "ppl": value, "eval_s": time.perf_counter() - t,
            "phases": {"build dependency graph": build.as_dict(), "score + prune": step.as_dict()},
            "prune_wall_s": build.wall_s + step.wall_s, "peak_rss_gb": max(build.peak_gb, step.peak_gb),
            "peak_increase_gb": max(p.peak_gb - p.rss_before_gb for p in (build, step))})
        log(f"torch-pruning {r} (ratio {ratio:.4f}): ppl {value:.3f}, params {params:,} (fxprune {fx_after[r]:,})")
        del m2
        write_json(out.with_suffix(".json"), report)
    finish(report)
    write_json(out.with_suffix(".json"), report)
    out.with_suffix(".md").write_text(render(report))
    log(f"wrote {out}.json and {out}.md")
    return report


if __name__ == "__main__":
    main()
