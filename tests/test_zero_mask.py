"""Zero-mask oracle: pruning heads and MLP channels equals zeroing them at the output projection; and every
family the tests build, pruned by a cheap importance, gives a graph that runs."""
import functools

import pytest
import torch

import fxprune
import coupling_models
import families
from models import FAMILIES
from oracles import inputs, prune_random, rel_err, zero_masked
from test_families import analysed as families_analysed

CASES = [(fam, attn) for fam in FAMILIES for attn in ("eager", "sdpa") if not (fam == "bloom" and attn == "sdpa")]
COUPLING = {"all_heads_norm": coupling_models.AllHeadsNorm, "per_head_norm": coupling_models.PerHeadNorm,
            "per_head_norm_8": functools.partial(coupling_models.PerHeadNorm, 8),
            "per_head_norm_gqa": coupling_models.PerHeadNormGQA,
            "per_head_norm_repeat_kv": functools.partial(coupling_models.PerHeadNormGQA, repeat=True)}
# One layer of 4 heads and no MLP: the planner's steps miss 20% (8 heads miss 50%), so each ratio has its size
RATIOS = {"per_head_norm": (0.5,), "per_head_norm_8": (0.2,)}
EAGER_ONLY = {"bloom", "gemma2"}  # no sdpa path in transformers (Bloom, Gemma-2)
SWEEP = [(fam, "eager" if fam in EAGER_ONLY else "sdpa", ratio) for fam in list(FAMILIES) + list(families.FAMILIES)
         for ratio in (0.2, 0.5)] + [(name, None, ratio) for name in COUPLING for ratio in RATIOS.get(name, (0.2, 0.5))]


@functools.lru_cache(maxsize=None)
def analysed(family, attn):
    """(model, analysis) of a family of models.py or families.py (test_families' own, shared in one run), or
    of a coupling model (attn None)."""
    if family in families.FAMILIES:
        return families_analysed(family, attn)
    model = COUPLING[family]().eval() if attn is None else FAMILIES[family](attn)
    return model, fxprune.analyze(model)


@pytest.mark.parametrize("ratio", [0.2, 0.5])
@pytest.mark.parametrize("family,attn", CASES)
def test_zero_mask_equivalence(family, attn, ratio):
    model, dg = analysed(family, attn)
    dg, plan, gm = prune_random(model, ratio, seed=int(ratio * 10), dg=dg)
    assert abs(plan.removed_fraction - ratio) <= 0.01
    kept_per_group = [len(u) for u in plan.units.values()]
    assert len(set(kept_per_group)) > 1 or len(plan.units) == 1, "selection should be non-uniform"
    ids, mask = inputs()
    with torch.no_grad():
        expected = zero_masked(model, dg, plan)(ids, attention_mask=mask).logits
        got = gm(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert rel_err(got[keep], expected[keep]) < 1e-5
    assert sum(p.numel() for p in gm.parameters()) == plan.params_after


@pytest.mark.parametrize("family,attn,ratio", SWEEP)
def test_every_family_pruned_by_l2_gives_a_graph_that_runs(family, attn, ratio):
    model, dg = analysed(family, attn)
    # the coupling models' embedding and head are most of their parameters: hidden channels reach the ratio
    targets = ("heads", "mlp") if attn else ("heads", "mlp", "hidden")
    gm = fxprune.compile(model, ratio, importance="l2", reconstruct="none", allocation="global", targets=targets,
                         dg=dg)
    plan = gm.meta[fxprune.PLAN_KEY]
    assert abs(plan.removed_fraction - ratio) <= 0.01 and sum(p.numel() for p in gm.parameters()) == plan.params_after
    ids, mask = inputs(vocab=model.config.vocab_size)
    keep = mask.bool()
    with torch.no_grad():
        logits = gm(ids, attention_mask=mask).logits
        # the zero-mask oracle where it applies: no hidden channels nor renormalising groups pruned, and projections
        # stored [out, in] (zero_masked zeroes the last dim; GPT-2's Conv1D stores [in, out]); elsewhere it must run
        linear_only = not any(type(m).__name__ == "Conv1D" for m in model.modules())
        oracle = attn is not None and not plan.renormalising and linear_only
        expected = zero_masked(model, dg, plan)(ids, attention_mask=mask).logits if oracle else None
    assert logits.shape == (*ids.shape, model.config.vocab_size) and torch.isfinite(logits[keep]).all()
    if expected is not None:
        assert rel_err(logits[keep], expected[keep]) < 1e-5
