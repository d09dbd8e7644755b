"""Whole-expert pruning: router indices followed by value labels (fxprune/analysis/value_rules.py).

Oracle: removing experts equals the original model whose router gives the removed experts a logit
of -inf (they are never chosen; the top-k weights renormalise over the rest). For a uniform choice,
the config twin: MixtralForCausalLM with fewer `num_local_experts` loaded with the sliced weights.
"""
import copy
import types

import pytest
import torch

import fxprune
from families import mixtral
from oracles import inputs, random_scores, rel_err
from test_config_twin import uniform_plan
from test_families import smaller, zero_masked


@pytest.fixture(scope="module")
def analysed():
    model = mixtral("sdpa")
    return model, fxprune.analyze(model)


def mask_removed_experts(model, dg, plan):
    """`model` with each removed expert's router logit at -inf, heads/channels zeroed as in zero_masked."""
    other = {g: u for g, u in plan.units.items() if dg.groups[g].kind != "experts"}
    ref = zero_masked(model, dg, types.SimpleNamespace(units=other)) if other else copy.deepcopy(model)
    for gid, kept in plan.units.items():
        group = dg.groups[gid]
        if group.kind != "experts":
            continue
        removed = torch.ones(group.n_units, dtype=torch.bool)
        removed[kept] = False

        def reroute(router, args, out, removed=removed):
            logits = out[0].masked_fill(removed, float("-inf"))
            top, index = torch.softmax(logits.float(), dim=-1).topk(router.top_k, dim=-1)
            return out[0], top / top.sum(dim=-1, keepdim=True), index

        ref.model.layers[group.layer].mlp.gate.register_forward_hook(reroute)
    return ref


def test_experts_are_a_group_per_layer_that_keeps_top_k(analysed):
    model, dg = analysed
    assert dg.frozen_ops == [], dg.summary()
    experts = dg.by_kind("experts")
    assert [g.layer for g in experts] == [0, 1]
    for g in experts:
        assert (g.n_units, g.min_units) == (4, model.config.num_experts_per_tok)
        assert {(m.name.split(f"layers.{g.layer}.")[1], m.dim) for m in g.members} == {
            ("mlp.gate.weight", 0), ("mlp.experts.gate_up_proj", 0), ("mlp.experts.down_proj", 0)}


@pytest.mark.parametrize("ratio,targets", [(0.14, ("experts",)), (0.2, ("experts",)),
                                           (0.5, ("heads", "mlp", "experts"))])
def test_pruned_experts_equal_router_masked_to_minus_inf(analysed, ratio, targets):
    model, dg = analysed
    plan = fxprune.plan(model, ratio, targets=targets, scores=random_scores(dg, 7), dg=dg, allocation="global")
    assert "experts" in {dg.groups[g].kind for g in plan.units}
    gm = fxprune.apply(model, plan, dg=dg)
    ids, mask = inputs()
    with torch.no_grad():
        got = gm(ids, attention_mask=mask).logits
        expected = mask_removed_experts(model, dg, plan)(ids, attention_mask=mask).logits
        dense = model(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert rel_err(got[keep], expected[keep]) < 1e-5
    assert rel_err(got[keep], dense[keep]) > 1e-3  # the oracle is not trivially the dense model
    assert abs(plan.removed_fraction - ratio) <= 0.01
    assert sum(p.numel() for p in gm.parameters()) == plan.params_after


def test_top_k_experts_always_stay(analysed):
    model, dg = analysed
    plan = fxprune.plan(model, 0.27, targets=("experts",), scores=random_scores(dg, 1), dg=dg, allocation="global")
    assert [len(u) for u in plan.units.values()] == [2, 2]  # 4 of 8 experts: the most top-2 routing allows
    with pytest.raises(fxprune.PlanError, match="ratio 0.4 cannot be met"):
        fxprune.plan(model, 0.4, targets=("experts",), scores=random_scores(dg, 1), dg=dg)


def test_config_twin_with_fewer_experts():
    model = mixtral("sdpa")
    plan, gm = uniform_plan(model, {"experts": [1, 3], "hidden": list(range(1, 64, 2))})
    small = type(model)(smaller(model, num_local_experts=2, hidden_size=32)).eval()
    missing, unexpected = small.load_state_dict(gm.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    ids, mask = inputs()
    with torch.no_grad():
        assert rel_err(gm(ids, attention_mask=mask).logits, small(ids, attention_mask=mask).logits) < 1e-5


def test_expert_pruned_model_reexports_and_round_trips(analysed, tmp_path):
    model, dg = analysed
    plan = fxprune.plan(model, 0.3, targets=("heads", "mlp", "experts"), scores=random_scores(dg, 2), dg=dg)
    gm = fxprune.apply(model, plan, dg=dg)
    ids, mask = inputs()
    with torch.no_grad():
        logits = gm(ids, attention_mask=mask).logits
    ep = torch.export.export(gm, (ids,), {"attention_mask": mask}, strict=False)
    assert torch.allclose(ep.module()(ids, attention_mask=mask).logits, logits)
    fxprune.save(gm, tmp_path / "pruned")
    with torch.no_grad():
        assert torch.equal(fxprune.load(tmp_path / "pruned")(ids, attention_mask=mask).logits, logits)


# -- the value rules on small modules: followed where the op reads positions, frozen elsewhere -------
class GatherMoE(torch.nn.Module):
    """Embedding, experts chosen by top-k and gathered by index (no grouped matmul), head.
    `how` reads the router's positions in ways the expert dim cannot follow."""

    def __init__(self, how="gather", experts=4, hidden=8, vocab=16):
        super().__init__()
        self.how = how
        self.config = types.SimpleNamespace(vocab_size=vocab, max_position_embeddings=64)
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.gate = torch.nn.Linear(hidden, experts, bias=False)
        self.w = torch.nn.Parameter(torch.randn(experts, hidden, hidden) / hidden ** 0.5)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        x = self.embed(input_ids)
        top, index = torch.softmax(self.gate(x), dim=-1).topk(2, dim=-1)
        if self.how == "shifted":  # positions + 1 are no longer positions of the expert dim
            index = (index + 1) % self.w.shape[0]
        if self.how == "histc_wide":  # bins beyond the expert range: the counts are not per expert
            counts = torch.histc(index.float(), bins=self.w.shape[0] + 1, min=0, max=self.w.shape[0])
            x = x * counts.sum()
        y = torch.einsum("bsh,bskhg->bskg", x, self.w[index])
        return (self.head((y * top.unsqueeze(-1)).sum(2)),)


def test_index_by_router_positions_is_followed():
    torch.manual_seed(0)
    module = GatherMoE().eval()
    dg = fxprune.analyze(module)
    (group,) = dg.by_kind("experts")
    assert (group.n_units, group.min_units) == (4, 2) and dg.frozen_ops == [], dg.summary()
    plan = fxprune.plan(module, 72 / 544, targets=("experts",), scores={group.id: torch.tensor([4.0, 1, 3, 2])}, dg=dg)
    assert plan.units == {group.id: [0, 2, 3]}
    gm = fxprune.apply(module, plan, dg=dg)
    ref = copy.deepcopy(module)
    ref.gate.register_forward_hook(lambda mod, args, out: out.masked_fill(torch.tensor([False, True, False, False]),
                                                                         float("-inf")))
    ids = torch.randint(0, 16, (3, 7))
    with torch.no_grad():
        assert rel_err(gm(ids).logits, ref(ids)[0]) < 1e-6
    assert gm.w.shape[0] == 3 and sum(p.numel() for p in gm.parameters()) == plan.params_after


@pytest.mark.parametrize("how,why", [("shifted", "reads values"), ("histc_wide", "bins do not match")])
def test_router_positions_read_otherwise_freeze_the_experts(how, why):
    dg = fxprune.analyze(GatherMoE(how).eval())
    assert dg.by_kind("experts") == []
    atom = dg.table.find(dg.dims_of("gate.weight")[0])  # the router rows: the dim the top-k positions are in
    assert atom.frozen and why in atom.frozen_by, atom.frozen_by


def test_taylor_scores_of_whole_experts_equal_plain_autograd(analysed):
    """element1 of expert e: |w * dL/dw| summed over the router row e and expert e's two weights, the
    gradient that of the model's own loss (it flows through the router and the grouped matmuls)."""
    from fxprune.scoring import score
    model, dg = analysed
    ids = torch.randint(1, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    groups = dg.by_kind("experts")
    scores = score(dg, groups, method="element1", calibration=[ids])
    params = dict(model.named_parameters())
    loss = model(ids, labels=ids).loss
    for g in groups:
        assert all(m.dim == 0 for m in g.members)  # expert e is index e of every member's first dim
        weights = [params[m.name] for m in g.members]
        grads = torch.autograd.grad(loss, weights, retain_graph=True)
        expected = sum((w * grad).detach().abs().flatten(1).sum(1) for w, grad in zip(weights, grads))
        assert (expected > 0).sum() >= 2  # more than one expert is routed to
        assert rel_err(scores[g.id], expected) < 1e-4
