"""Two coupling patterns, each on a tiny model of its own:

1. a norm over all heads of a projection (RMSNorm over the whole `heads * head_dim` query/key output,
   before the split into heads): pruning heads changes the statistics the kept heads are normalised
   by, so the group is renormalising: proven by a smaller-config twin, not by zero-masking;
2. per-head parameters applied by splitting the heads dimension (one norm per head, applied to the
   single heads of a split, concatenated back);
3. the same under grouped-query attention, for the query heads (KV group x head within the group) and
   the key heads.
"""
import warnings

import pytest
import torch

import fxprune
from coupling_models import (HEAD_DIM, HIDDEN, VOCAB, AllHeadsNorm, PerHeadNorm, PerHeadNormGQA, all_heads_twin,
                             per_head_gqa_twin)
from fxprune.planning.config import PruneConfig
from fxprune.rewrite.emit import rewrite
from oracles import prune_random, random_scores, rel_err, zero_masked

@pytest.fixture(scope="module")
def all_heads():
    model = AllHeadsNorm().eval()
    return model, fxprune.analyze(model)


def kinds(dg):
    return {g.kind: g for g in dg.groups if g.kind in ("heads", "mlp", "hidden")}


def test_a_norm_over_all_heads_marks_the_heads_renormalising(all_heads):
    _, dg = all_heads
    groups = kinds(dg)
    assert groups["heads"].renormalising and groups["heads"].n_units == 4
    assert len(groups["heads"].renormalised_by) == 2  # the query's and the key's mean over heads * head_dim
    assert groups["hidden"].renormalising  # the final RMSNorm: the same situation for hidden channels
    assert not groups["mlp"].renormalising  # nothing takes statistics over the MLP channels
    line = next(l for l in dg.summary().splitlines() if l.startswith(f"g{groups['heads'].id} "))
    assert "renormalising (mean" in line


@pytest.mark.parametrize("kept", [[0, 2], [3]])
def test_the_pruned_model_is_the_smaller_config_twin(all_heads, kept):
    model, dg = all_heads
    gm = rewrite(dg, {kinds(dg)["heads"].atom_id: kept})
    twin = all_heads_twin(model, kept)
    assert sum(p.numel() for p in gm.parameters()) == sum(p.numel() for p in twin.parameters())
    for batch, seq in ((1, 7), (3, 5)):
        ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            torch.testing.assert_close(gm(ids).logits, twin(ids).logits)


def test_zero_masking_does_not_hold_there(all_heads):
    # Why the twin is the proof: zeroing the removed heads at o leaves them in the norm's mean, which
    # pruning takes over the kept heads only. The kept heads are normalised differently.
    model, dg = all_heads
    kept, removed = [0, 2], [1, 3]
    gm = rewrite(dg, {kinds(dg)["heads"].atom_id: kept})
    masked = AllHeadsNorm().eval()
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():
        for h in removed:
            masked.o.weight[:, h * HEAD_DIM:(h + 1) * HEAD_DIM] = 0
        ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
        assert rel_err(gm(ids).logits, masked(ids).logits) > 0.01


def test_the_planner_tells_and_can_exclude_renormalising_groups(all_heads):
    model, dg = all_heads
    heads = kinds(dg)["heads"]
    scores = {g.id: torch.arange(g.n_units, dtype=torch.float) for g in dg.groups}
    with pytest.warns(UserWarning, match=rf"renormalising groups g{heads.id} \(heads, layer 0, by mean.*are pruned"):
        allowed = fxprune.plan(model, 0.2, targets=("heads", "mlp"), scores=scores, dg=dg)
    assert allowed.renormalising == [heads.id] and heads.id in allowed.units
    cfg = PruneConfig(ratio=0.1, targets=("heads", "mlp"), renormalising="exclude")
    with pytest.warns(UserWarning, match=rf"g{heads.id} .*are left whole"):
        excluded = fxprune.plan(model, cfg, scores=scores, dg=dg)
    assert excluded.renormalising == [heads.id] and heads.id not in excluded.units and excluded.units
    assert fxprune.PrunePlan.from_json(excluded.to_json()).renormalising == [heads.id]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to tell when no targeted group renormalises
        assert fxprune.plan(model, 0.1, targets=("mlp",), scores=scores, dg=dg,
                            reconstruct="none").renormalising == []  # no calibration here: nothing to refit on
    with pytest.raises(ValueError, match="renormalising must be one of"):
        PruneConfig(renormalising="ignore")


def assert_zero_masked(model, dg, plan, gm, before):
    """The pruned logits are the zero-masked original's at batch 1 and 3, and `model` still holds `before`."""
    reference = zero_masked(model, dg, plan)
    for batch, seq in ((1, 7), (3, 5)):
        ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            assert rel_err(gm(ids).logits, reference(ids).logits) < 1e-5
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the input model unchanged


# -- 2. per-head parameters applied by splitting the heads ---------------------------------------------

@pytest.fixture(scope="module")
def per_head():
    model = PerHeadNorm().eval()
    return model, fxprune.analyze(model)


def test_each_heads_norm_belongs_to_its_head(per_head):
    model, dg = per_head
    heads = kinds(dg)["heads"]
    assert heads.n_units == 4 and not heads.renormalising  # each norm sees its own head only
    owned = [(m.name, m.unit_of.unique().tolist()) for m in heads.members if m.name.startswith("q_norms")]
    assert owned == [(f"q_norms.{i}.{p}", [i]) for i in range(4) for p in ("bias", "weight")]
    hidden = model.embed.weight.shape[1]
    assert heads.params_per_unit == 3 * HEAD_DIM * hidden + hidden * HEAD_DIM + 2 * HEAD_DIM  # q, k, v, o, its norm
    assert dg.count_parameters({heads.atom_id: 1}) == dg.num_parameters() - 3 * heads.params_per_unit


@pytest.mark.parametrize("seed", [0, 1])
def test_zero_mask_and_exact_counts_when_heads_go(per_head, seed):
    model, dg = per_head
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = fxprune.plan(model, 0.25, targets=("heads",), scores=random_scores(dg, seed), dg=dg)
    heads = kinds(dg)["heads"]
    kept = plan.units[heads.id]
    assert 0 < len(kept) < 4
    gm = fxprune.apply(model, plan, dg=dg)
    removed = [i for i in range(4) if i not in kept]
    assert sum(p.numel() for p in gm.parameters()) == plan.params_after == \
        dg.num_parameters() - len(removed) * heads.params_per_unit
    names = {n for n, _ in gm.named_parameters()}
    assert {f"q_norms.{i}.weight" for i in kept} <= names and not {f"q_norms.{i}.weight" for i in removed} & names
    cats = [n for n in gm.graph.nodes if n.target is torch.ops.aten.cat.default]
    assert len(cats) == 1 and len(cats[0].args[0]) == len(kept)  # one cat input per kept head
    assert_zero_masked(model, dg, plan, gm, before)


# -- 3. per-head norms under grouped-query attention ----------------------------------------------------

@pytest.fixture(scope="module", params=[False, True], ids=["enable_gqa", "repeat_kv"])
def per_head_gqa(request):
    model = PerHeadNormGQA(heads=6, kv_heads=2, repeat=request.param).eval()
    return model, fxprune.analyze(model)


def test_each_query_heads_norm_belongs_to_its_group_and_its_head(per_head_gqa):
    model, dg = per_head_gqa
    groups = kinds(dg) | {g.kind: g for g in dg.groups if g.kind in ("kv_groups", "group_heads")}
    kv, per_group = groups["kv_groups"], groups["group_heads"]
    assert (kv.n_units, per_group.n_units) == (2, 3) and dg.frozen_ops == []
    unit = lambda group, prefix: [(m.name, m.unit_of.unique().tolist()) for m in group.members
                                  if m.name.startswith(prefix) and m.name.endswith("weight")]
    assert unit(kv, "q_norms") == [(f"q_norms.{i}.weight", [i // 3]) for i in range(6)]
    assert unit(per_group, "q_norms") == [(f"q_norms.{i}.weight", [i % 3]) for i in range(6)]
    assert unit(kv, "k_norms") == [(f"k_norms.{i}.weight", [i]) for i in range(2)] and not unit(per_group, "k_norms")
    norm = 2 * HEAD_DIM
    assert kv.params_per_unit == 3 * (HIDDEN * HEAD_DIM * 2 + norm) + 2 * (HIDDEN * HEAD_DIM) + norm  # q, o; k, v
    assert per_group.params_per_unit == 2 * (HIDDEN * HEAD_DIM * 2 + norm)  # one query head in each group


@pytest.mark.parametrize("kv_kept,per_group_kept", [([1], [0, 1, 2]), ([0, 1], [0, 2]), ([1], [2])])
def test_the_pruned_gqa_model_is_the_smaller_config_twin(per_head_gqa, kv_kept, per_group_kept):
    model, dg = per_head_gqa
    kv, per_group = (next(g for g in dg.groups if g.kind == k) for k in ("kv_groups", "group_heads"))
    gm = rewrite(dg, {kv.atom_id: kv_kept, per_group.atom_id: per_group_kept})
    twin = per_head_gqa_twin(model, kv_kept, per_group_kept)
    assert sum(p.numel() for p in gm.parameters()) == sum(p.numel() for p in twin.parameters()) == \
        dg.count_parameters({kv.atom_id: len(kv_kept), per_group.atom_id: len(per_group_kept)})
    for batch, seq in ((1, 7), (3, 5)):
        ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            torch.testing.assert_close(gm(ids).logits, twin(ids).logits)


@pytest.mark.parametrize("gqa,ratio", [("groups", 0.3), ("heads", 0.2)])  # heads: one of three per group at most
def test_compile_with_l2_gives_a_graph_that_runs_and_is_zero_masked(per_head_gqa, gqa, ratio):
    model, dg = per_head_gqa
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = fxprune.compile(model, ratio=ratio, importance="l2", reconstruct="none", gqa=gqa, dg=dg)
    plan = gm.meta[fxprune.PLAN_KEY]
    assert abs(plan.removed_fraction - ratio) <= 0.01
    assert sum(p.numel() for p in gm.parameters()) == plan.params_after
    pruned = {dg.groups[gid].kind for gid, kept in plan.units.items() if len(kept) < dg.groups[gid].n_units}
    assert {"kv_groups" if gqa == "groups" else "group_heads"} <= pruned
    assert_zero_masked(model, dg, plan, gm, before)
