"""Zero-mask oracle: pruning heads and MLP channels equals zeroing them at the output projection."""
import pytest
import torch

from models import FAMILIES
from oracles import inputs, prune_random, rel_err, zero_masked

CASES = [(fam, attn) for fam in FAMILIES for attn in ("eager", "sdpa") if not (fam == "bloom" and attn == "sdpa")]


@pytest.mark.parametrize("ratio", [0.2, 0.5])
@pytest.mark.parametrize("family,attn", CASES)
def test_zero_mask_equivalence(family, attn, ratio):
    model = FAMILIES[family](attn)
    dg, plan, gm = prune_random(model, ratio, seed=int(ratio * 10))
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
