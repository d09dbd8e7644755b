"""Refit-aware importance ("obs"): greedy structured optimal brain surgeon against brute-force least squares."""
import pytest
import torch

import fxprune
from fxprune.reconstruction.projections import inverse_energy
from fxprune.scoring import OBS, score
from fxprune.scoring.activations import input_statistics
from fxprune.scoring.obs import greedy_scores
from models import llama

pytestmark = pytest.mark.usefixtures("one_thread")
CAL = torch.randint(1, 128, (6, 10), generator=torch.Generator().manual_seed(3))


def refit_error(x, w, removed):
    """sum_t ||x_t W^T - (x_t,kept B^T + c)||^2 for the best B and c: exact least squares, no shortcut."""
    y = x @ w.t()
    kept = [j for j in range(x.shape[1]) if j not in removed]
    a = torch.cat([x[:, kept], torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    fit = a @ torch.linalg.lstsq(a, y).solution
    return float((y - fit).pow(2).sum())


def brute_force_greedy(x, w, unit_of, n_units):
    """The units in the order a greedy removal takes them, each step trying every remaining unit."""
    removed, order = set(), []
    while len(order) < n_units:
        errs = {u: refit_error(x, w, removed | set((unit_of == u).nonzero().flatten().tolist()))
                for u in range(n_units) if u not in order}
        best = min(errs, key=errs.get)
        order.append(best)
        removed |= set((unit_of == best).nonzero().flatten().tolist())
    return order


def augmented_gram(x):
    xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    return xa.t() @ xa


@pytest.mark.parametrize("width", [1, 3])
def test_greedy_removal_follows_the_exact_least_squares_errors(width):
    g = torch.Generator().manual_seed(width)
    n_units = 8
    mix = torch.randn(n_units * width, n_units * width, generator=g)   # correlated inputs: what OBS exploits
    x = (torch.randn(300, n_units * width, generator=g) @ mix + torch.randn(n_units * width, generator=g)).double()
    w = torch.randn(5, n_units * width, generator=g).double()
    unit_of = torch.arange(n_units).repeat_interleave(width)
    scores = greedy_scores(w, augmented_gram(x), unit_of, n_units, damp=1e-10)
    assert torch.argsort(scores).tolist() == brute_force_greedy(x, w, unit_of, n_units)
    first = int(scores.argmin())  # and the score is the refit error itself
    alone = refit_error(x, w, set((unit_of == first).nonzero().flatten().tolist()))
    assert scores[first].item() == pytest.approx(alone, rel=1e-6)


def test_scores_rise_strictly_so_keeping_the_top_k_keeps_the_greedy_survivors():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(200, 6, generator=g).double()
    w = torch.zeros(4, 6, dtype=torch.float64)   # equal (zero) errors everywhere: ties must still be broken
    w[:, :2] = torch.randn(4, 2, generator=g).double()
    scores = greedy_scores(w, augmented_gram(x), torch.arange(6), 6, damp=1e-6)
    assert len(set(scores.tolist())) == 6
    assert set(torch.argsort(scores)[-2:].tolist()) == {0, 1}   # the only columns that matter survive


def test_the_gram_matrix_is_the_refits_weighted_one():
    model = llama("sdpa")
    dg = fxprune.analyze(model)
    layer = model.model.layers[1]
    seen = {}
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0])),
             layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0]))]
    with torch.no_grad():
        model(CAL)
    for h in hooks:
        h.remove()
    name = "model.layers.1.mlp.down_proj.weight"
    x = seen["x"].reshape(-1, seen["x"].shape[-1]).double()
    out = x @ layer.mlp.down_proj.weight.detach().double().t()
    energy = inverse_energy(out, seen["h"].reshape(-1, out.shape[-1]).double())
    weights = energy / energy.mean()   # normalised over all tokens, whatever batches they were run in
    xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    stats = input_statistics(dg, CAL.split(2), [name], batch_size=1, gram={(name, 1)})[name]
    assert torch.allclose(stats.gram.double(), (xa * weights[:, None]).t() @ xa, rtol=1e-4, atol=1e-6)
    assert stats.weight_scale == pytest.approx(float(energy.mean()), rel=1e-5)
    assert not torch.allclose(weights, torch.ones_like(weights), atol=0.05)  # the weighting is not a no-op here
    assert input_statistics(dg, [CAL], [name])[name].gram is None  # only where asked for


def test_scoring_a_model_reads_each_output_projection_and_plans_with_the_refit():
    model = llama("sdpa")
    dg = fxprune.analyze(model)
    groups = [g for g in dg.groups if g.kind in ("mlp", "kv_groups")]
    scores = score(dg, groups, "obs", calibration=CAL)
    assert all(torch.isfinite(s).all() and (s > 0).all() for s in scores.values())
    damped = score(dg, groups, OBS(damp=1.0), calibration=CAL)
    assert any(not torch.equal(scores[k], damped[k]) for k in scores)   # the setting reaches the estimator
    gm = fxprune.compile(model, 0.3, calibration=CAL, importance="obs", reconstruct="lstsq")
    plan = gm.meta[fxprune.PLAN_KEY]
    pruned = [g for g in groups if g.id in plan.units]
    assert pruned
    for g in pruned:   # each group keeps exactly its highest obs scores (the greedy removal's survivors)
        kept = plan.units[g.id]
        assert sorted(kept) == sorted(torch.topk(scores[g.id], len(kept)).indices.tolist())


def test_statistics_without_the_gram_matrix_are_refused_not_scored_by_l2():
    model = llama("sdpa")
    dg = fxprune.analyze(model)
    groups = [g for g in dg.groups if g.kind == "mlp"]
    plain = input_statistics(dg, [CAL])
    with pytest.raises(ValueError, match="Gram matrix"):
        score(dg, groups, "obs", calibration=CAL, inputs=plain)


@pytest.mark.parametrize("damp", [0, -1.0, True, "0.1"])
def test_damp_must_be_positive(damp):
    with pytest.raises(ValueError, match="OBS.damp"):
        OBS(damp=damp)


def test_absolute_allocation_ranks_the_scores_as_they_are_per_parameter():
    model = llama("sdpa")
    dg = fxprune.analyze(model)
    groups = [g for g in dg.groups if g.kind in ("mlp", "kv_groups")]
    scores = score(dg, groups, "obs", calibration=CAL)
    plan = fxprune.plan(model, 0.25, scores=scores, dg=dg, allocation="absolute", reconstruct="none")
    assert abs(plan.removed_fraction - 0.25) <= 0.01
    mlp0 = next(g for g in groups if g.kind == "mlp" and g.layer == 0)
    assert len(plan.units[mlp0.id]) < mlp0.n_units   # the probe below is not vacuous

    def scaled(factor):
        return {k: v * factor if k == mlp0.id else v for k, v in scores.items()}
    # one group's errors a million times larger: it keeps every unit; a rescaling the per-group
    # normalisations cancel ("global", "flap") moves nothing there
    rescaled = fxprune.plan(model, 0.25, scores=scaled(1e6), dg=dg, allocation="absolute", reconstruct="none")
    assert mlp0.id not in rescaled.units   # a plan lists only the groups it prunes
    global_plan = fxprune.plan(model, 0.25, scores=scores, dg=dg, allocation="global", reconstruct="none")
    assert fxprune.plan(model, 0.25, scores=scaled(1e6), dg=dg, allocation="global",
                        reconstruct="none").units == global_plan.units
