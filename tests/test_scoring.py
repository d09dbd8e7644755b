"""fxprune.scoring: estimators against hand computations, gradients against plain autograd, HyWIA."""
from __future__ import annotations

import copy
import json
import weakref
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fxprune import scoring
from fxprune.data.calibration import Calibration
from fxprune.analysis.analyze import analyze
from fxprune.analysis.groups import Group, Member
from fxprune.scoring import (AGGREGATIONS, ESTIMATORS, HyWIA, UnitStats, compute_gradients, hywia, register_estimator,
                             score, unit_sum)

GRADIENT_METHODS = ["vector", "element1", "element2", "mix", "second"]
DETERMINISTIC = ["l1", "l2"] + GRADIENT_METHODS


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def tiny_llama(tied=False, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=tied)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial norm weights, so that their members matter
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return model


def calibration_batches(n=2, batch=2, seq=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (batch, seq), generator=g) for _ in range(n)]


def reference_gradients(model, batches):
    """G: mean over batches of the HF loss gradient; H: sum over samples of squared gradients / N."""
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    names = list(params)
    G = {n: torch.zeros_like(p) for n, p in params.items()}
    H = {n: torch.zeros_like(p) for n, p in params.items()}
    for ids in batches:
        grads = torch.autograd.grad(ref(ids, labels=ids).loss, [params[n] for n in names])
        for n, g in zip(names, grads):
            G[n] += g / len(batches)
    rows = [row[None] for ids in batches for row in ids]
    for row in rows:
        grads = torch.autograd.grad(ref(row, labels=row).loss, [params[n] for n in names])
        for n, g in zip(names, grads):
            H[n] += g * g / len(rows)
    return G, H


@pytest.fixture(scope="module")
def env():
    model = tiny_llama()
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    dg = analyze(model)
    cal = calibration_batches()
    G, H = reference_gradients(model, cal)
    grads = compute_gradients(dg, cal, second_order=True)
    return SimpleNamespace(model=model, snapshot=snapshot, dg=dg, cal=cal, G=G, H=H, grads=grads,
                           W={n: p.detach() for n, p in model.named_parameters()})


def close(got, expected, rtol=2e-4):
    torch.testing.assert_close(got, expected, rtol=rtol, atol=1e-5 * float(expected.abs().max()) + 1e-12)


def group_of(dg, kind, layer):
    found = [g for g in dg.groups if g.kind == kind and g.layer == layer]
    assert len(found) == 1, [g.describe() for g in dg.groups]
    return found[0]


# -- formulas on hand-made stats ----------------------------------------------------------------------

def element_value(est, w, g, h):
    """Per-unit value of one slice (all weights of one unit in one member) by the estimator's formula."""
    return {
        "l1": lambda: w.abs().sum(),
        "l2": lambda: (w * w).sum(),
        "vector": lambda: (w * g).sum().abs(),
        "element1": lambda: (w * g).abs().sum(),
        "element2": lambda: (w * g - 0.5 * w * h * w).abs().sum(),
        "mix": lambda: (w * g - 0.5 * w * h * w).abs().sum(),
        "second": lambda: (w * h * w).abs().sum(),
    }[est]()


def test_registry_has_the_llm_pruner_estimators():
    assert {"random", "l1", "l2", "vector", "element1", "element2", "mix", "second"} <= set(ESTIMATORS)
    assert ESTIMATORS["element2"].needs == {"grad", "sq_grad"}
    assert ESTIMATORS["vector"].needs == {"grad"}
    assert not ESTIMATORS["l2"].needs
    assert set(AGGREGATIONS) == {"sum", "mean", "max", "prod", "last"}


def test_unit_sum_sums_each_unit_over_all_other_dims():
    x = torch.arange(24.0).reshape(2, 6, 2)
    unit_of = torch.tensor([1, 0, -1, 1, 2, 0])
    got = unit_sum(x, 1, unit_of, 3)
    expected = torch.stack([x[:, [1, 5]].sum(), x[:, [0, 3]].sum(), x[:, 4].sum()])
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="unit_of has 5 entries"):
        unit_sum(x, 1, unit_of[:5], 3)


@pytest.mark.parametrize("est", DETERMINISTIC)
def test_estimator_formulas_on_hand_made_stats(est):
    g = torch.Generator().manual_seed(3)
    W, G = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    H = torch.rand(4, 6, generator=g) * 3  # same scale as W*G: the second-order term matters here
    unit_of = torch.tensor([0, 0, 1, -1, 1, 2])  # units along dim 1; position 3 belongs to none
    member = Member("w", 1, unit_of)
    group = Group(0, "mlp", 3, 0, [member], atom_id=0, params_per_unit=0)
    got = ESTIMATORS[est](UnitStats(group, member, 0, W, grad=G, sq_grad=H))
    cols = {0: [0, 1], 1: [2, 4], 2: [5]}
    expected = torch.stack([element_value(est, W[:, c], G[:, c], H[:, c]) for c in cols.values()])
    torch.testing.assert_close(got, expected)
    if est == "element2":  # the Hessian term is really there
        assert not torch.allclose(got, ESTIMATORS["element1"](UnitStats(group, member, 0, W, grad=G)))


# -- end to end on a tiny Llama ---------------------------------------------------------------------

def test_gradients_match_plain_autograd(env):
    assert env.grads.n_samples == 4
    for name in env.grads.grad:
        close(env.grads.grad[name], env.G[name])
        close(env.grads.sq_grad[name], env.H[name])
    with torch.no_grad():
        losses = [float(env.model(ids, labels=ids).loss) for ids in env.cal]
    assert env.grads.loss == pytest.approx(sum(losses) / len(losses), rel=1e-5)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("est", DETERMINISTIC)
def test_mlp_group_against_hand_computation(env, est, aggregation):
    group = group_of(env.dg, "mlp", 0)
    prefix = "model.layers.0.mlp."
    assert {(m.name, m.dim) for m in group.members} == {
        (prefix + "gate_proj.weight", 0), (prefix + "up_proj.weight", 0), (prefix + "down_proj.weight", 1)}
    W, G, H = env.W, env.G, env.H
    per_member = {}
    for part in ("gate_proj", "up_proj"):  # unit j: row j
        n = prefix + part + ".weight"
        per_member[part] = torch.stack([element_value(est, W[n][j], G[n][j], H[n][j]) for j in range(96)])
    n = prefix + "down_proj.weight"  # unit j: column j
    per_member["down_proj"] = torch.stack([element_value(est, W[n][:, j], G[n][:, j], H[n][:, j]) for j in range(96)])
    stacked = torch.stack(list(per_member.values()))
    expected = {"sum": stacked.sum(0), "mean": stacked.mean(0), "max": stacked.amax(0), "prod": stacked.prod(0),
                "last": per_member["down_proj"]}[aggregation]  # down_proj is read last in the graph
    got = score(env.dg, [group], est, env.cal, aggregation=aggregation, gradients=env.grads)
    assert set(got) == {group.id}
    close(got[group.id], expected)


def test_attention_and_hidden_groups_l2_by_hand(env):
    W = env.W
    kv = group_of(env.dg, "kv_groups", 1)
    p = "model.layers.1.self_attn."
    expected = torch.stack([
        W[p + "q_proj.weight"][32 * u:32 * u + 32].pow(2).sum() + W[p + "k_proj.weight"][16 * u:16 * u + 16].pow(2).sum()
        + W[p + "v_proj.weight"][16 * u:16 * u + 16].pow(2).sum() + W[p + "o_proj.weight"][:, 32 * u:32 * u + 32].pow(2).sum()
        for u in range(2)])
    close(score(env.dg, [kv], "l2")[kv.id], expected)

    hidden = [g for g in env.dg.groups if g.kind == "hidden"]
    assert len(hidden) == 1
    columns = ["model.embed_tokens.weight", "lm_head.weight"] + [
        f"model.layers.{i}.{m}.weight" for i in range(2)
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")]
    rows = [f"model.layers.{i}.{m}.weight" for i in range(2) for m in ("self_attn.o_proj", "mlp.down_proj")]
    norms = ["model.norm.weight"] + [f"model.layers.{i}.{m}.weight" for i in range(2)
                                     for m in ("input_layernorm", "post_attention_layernorm")]
    expected = (sum(W[n].pow(2).sum(0) for n in columns) + sum(W[n].pow(2).sum(1) for n in rows)
                + sum(W[n].pow(2) for n in norms))
    close(score(env.dg, hidden, "l2")[hidden[0].id], expected)


def loop_reference(est, W, G, H, member, n_units):
    """Independent per-unit values: select each unit's positions with a boolean mask."""
    out = []
    for u in range(n_units):
        idx = (member.unit_of == u).nonzero().flatten()
        sl = lambda t: t.index_select(member.dim, idx)
        out.append(element_value(est, sl(W), sl(G), sl(H)))
    return torch.stack(out)


@pytest.mark.parametrize("est", DETERMINISTIC)
def test_every_group_against_a_loop_reference(env, est):
    got = score(env.dg, None, est, env.cal, gradients=env.grads)
    assert set(got) == {g.id for g in env.dg.groups}
    for group in env.dg.groups:
        members = [m for m in group.members if m.name in env.dg.parameters]
        expected = sum(loop_reference(est, env.W[m.name], env.G[m.name], env.H[m.name], m, group.n_units)
                       for m in members)
        assert got[group.id].shape == (group.n_units,) and got[group.id].dtype == torch.float32
        close(got[group.id], expected)


def test_model_is_left_untouched(env):
    for method in GRADIENT_METHODS:
        score(env.dg, None, method, env.cal)
    hywia(env.dg, None, env.cal, steps=3)
    for name, p in env.model.named_parameters():
        assert torch.equal(p, env.snapshot[name]), name
        assert p.grad is None, name
        assert p.requires_grad, name
    assert all(t.grad is None for t in env.dg.parameters.values())


def test_random_is_seeded(env):
    a = score(env.dg, None, "random", seed=1)
    b = score(env.dg, None, "random", seed=1)
    c = score(env.dg, None, "random", seed=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert all(v.shape == (g.n_units,) for g in env.dg.groups for v in [a[g.id]])


def test_custom_estimator(env):
    @register_estimator("test_positions")
    def positions(stats):
        return stats.reduce(torch.ones_like(stats.weight))

    @register_estimator("test_grad_l1", needs=("grad",))
    def grad_l1(stats):
        return stats.reduce(stats.grad.abs())

    @register_estimator("test_bad_shape")
    def bad(stats):
        return torch.zeros(stats.n_units + 1)

    try:
        mlp = group_of(env.dg, "mlp", 1)
        got = score(env.dg, [mlp], "test_positions")[mlp.id]
        assert torch.equal(got, torch.full((96,), 3 * 64.0))  # gate row + up row + down column
        assert float(got[0]) == mlp.params_per_unit
        n = "model.layers.1.mlp.down_proj.weight"
        got = score(env.dg, [mlp], "test_grad_l1", env.cal, aggregation="last", gradients=env.grads)[mlp.id]
        close(got, env.G[n].abs().sum(0))
        with pytest.raises(ValueError, match="calibration"):
            score(env.dg, [mlp], "test_grad_l1")
        with pytest.raises(ValueError, match=r"expected a tensor of shape \(96,\)"):
            score(env.dg, [mlp], "test_bad_shape")
    finally:
        for name in ("test_positions", "test_grad_l1", "test_bad_shape"):
            ESTIMATORS.pop(name, None)


def test_errors_are_clear(env):
    dg = env.dg
    with pytest.raises(ValueError, match="calibration"):
        score(dg, None, "element1")
    with pytest.raises(ValueError, match="calibration"):
        hywia(dg, None, None)
    with pytest.raises(ValueError, match=r"dtype torch.float32"):
        score(dg, None, "element1", [torch.rand(2, 8)])
    with pytest.raises(ValueError, match=r"calibration item 0: Calibration.ids must be a 2-D LongTensor .*\(8,\)"):
        score(dg, None, "element1", [torch.arange(8)])
    with pytest.raises(ValueError, match="without 'input_ids'"):
        score(dg, None, "vector", [{"ids": torch.zeros(2, 8, dtype=torch.long)}])
    with pytest.raises(ValueError, match="got str"):
        score(dg, None, "vector", ["hello world"])
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 128\)"):
        score(dg, None, "vector", [torch.full((1, 4), 500)])
    with pytest.raises(ValueError, match="unknown scoring method 'l3'"):
        score(dg, None, "l3")
    with pytest.raises(ValueError, match="unknown aggregation 'median'"):
        score(dg, None, "l2", aggregation="median")
    with pytest.raises(ValueError, match="ratio"):
        hywia(dg, None, env.cal, ratio=1.5)


def test_dict_calibration_with_padding_matches_hf_loss(env):
    ids = env.cal[0].clone()
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding of the second sample
    labels = ids.masked_fill(mask == 0, -100)
    ref = copy.deepcopy(env.model)
    params = dict(ref.named_parameters())
    names = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.o_proj.weight"]
    expected = torch.autograd.grad(ref(ids, attention_mask=mask, labels=labels).loss, [params[n] for n in names])
    got = compute_gradients(env.dg, [{"input_ids": ids, "attention_mask": mask}], names, batch_size=2)
    for n, e in zip(names, expected):
        close(got.grad[n], e)
    # a dict without a mask, a bare tensor and a list of tensors are the same calibration
    a = compute_gradients(env.dg, {"input_ids": env.cal[0]}, names, batch_size=2)
    b = compute_gradients(env.dg, env.cal[0], names, batch_size=2)
    assert all(torch.equal(a.grad[n], b.grad[n]) for n in names)


def test_batch_size_and_checkpointing_do_not_change_scores(env):
    groups = [group_of(env.dg, "mlp", 0), group_of(env.dg, "kv_groups", 0)]
    base = score(env.dg, groups, "element1", env.cal, batch_size=1)
    for kwargs in ({"batch_size": 2}, {"batch_size": 3}, {"checkpoint": True}, {"checkpoint": 4}):
        other = score(env.dg, groups, "element1", env.cal, **kwargs)
        for g in groups:
            close(other[g.id], base[g.id])
    # only the group members get gradient accumulators
    got = compute_gradients(env.dg, env.cal, ["model.layers.0.mlp.up_proj.weight"])
    assert list(got.grad) == ["model.layers.0.mlp.up_proj.weight"] and got.sq_grad is None


def test_gradient_sums_in_place_match_one_row_passes_and_hywia_frees_them(env, monkeypatch):
    from fxprune.scoring import hybrid
    full = Calibration.of(torch.cat(env.cal))
    kept, real = [], hybrid.gradients_for

    def spy(*args):
        stats = real(*args)
        kept.append(weakref.ref(next(iter(stats.grad.values()))))
        return stats
    monkeypatch.setattr(hybrid, "gradients_for", spy)
    hywia(env.dg, None, full, ratio=0.3, settings=HyWIA(steps=1, validate=False))
    assert kept and kept[0]() is None  # the gradients are not held once the scores are made
    # full rows: one pass of all rows gives the mean of the one-row gradients (float32 sums kept in .grad)
    names = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    one, all_rows = (compute_gradients(env.dg, full, names, batch_size=b) for b in (1, len(full)))
    for n in names:
        close(all_rows.grad[n], one.grad[n])
        close(one.grad[n], env.G[n])
    assert all_rows.n_samples == one.n_samples == len(full) and math.isclose(all_rows.loss, one.loss, rel_tol=1e-5)


def test_checkpointed_forward_runs_the_graph_in_segments(env, monkeypatch):
    from fxprune.scoring import forward as runner
    tensors = runner.model_tensors(env.dg, torch.device("cpu"), None)
    ids = env.cal[0]
    plain = runner.forward(env.dg, tensors, ids, None)
    calls = []
    original = runner._checkpoint
    monkeypatch.setattr(runner, "_checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    segmented = runner.forward(env.dg, tensors, ids, None, checkpoint=5)
    assert len(calls) == 5
    torch.testing.assert_close(segmented, plain)
    with torch.no_grad():
        torch.testing.assert_close(plain, env.model(ids).logits)


def test_tied_embeddings_get_the_gradient_of_both_uses():
    model = tiny_llama(tied=True, seed=4)
    dg = analyze(model)
    assert dg.aliases  # lm_head.weight -> model.embed_tokens.weight
    cal = calibration_batches(n=1, seed=5)
    G, _ = reference_gradients(model, cal)
    grads = compute_gradients(dg, cal)
    canonical = "model.embed_tokens.weight"
    assert canonical in grads.grad and "lm_head.weight" not in grads.grad
    close(grads.grad[canonical], G[canonical])
    assert all(p.grad is None for p in model.parameters())


# -- HyWIA ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hy(env):
    return hywia(env.dg, None, env.cal, ratio=0.25, steps=12, seed=0, gradients=env.grads, validate=False)


def normalised_levels(env):
    """Each HyWIA granularity's estimator, normalised per group to mean 1, in HyWIA's order."""
    out = {}
    for k, method in (("fine", "element1"), ("coarse", "vector"), ("wanda", "wanda"), ("flap", "flap")):
        raw = score(env.dg, None, method, env.cal, gradients=env.grads)
        out[k] = {gid: v / v.mean() for gid, v in raw.items()}
    return out


def test_hywia_scores_are_finite_and_blend_the_granularities(env, hy):
    levels = normalised_levels(env)
    assert hy.granularities == ("fine", "coarse", "wanda", "flap")
    assert set(hy.scores) == {g.id for g in env.dg.groups}
    differs = False
    for g in env.dg.groups:
        s = hy.scores[g.id]
        assert s.shape == (g.n_units,) and torch.isfinite(s).all()
        a = hy.alpha[g.id]
        assert a.shape == (4,) and float(a.sum()) == pytest.approx(1.0, abs=1e-6) and (a >= 0).all()
        for k in hy.granularities:
            close(hy.levels[k][g.id], levels[k][g.id], rtol=1e-5)
        close(s, sum(a[i] * levels[k][g.id] for i, k in enumerate(hy.granularities)), rtol=1e-5)
        differs |= not torch.allclose(s, levels["fine"][g.id], rtol=1e-3)
    assert differs
    assert len(hy.losses) == 12 and all(math.isfinite(x) for x in hy.losses)
    # the attention of the maskable kinds was learned; the others keep their initial equal weights
    for g in env.dg.groups:
        learned = not torch.allclose(hy.alpha[g.id], torch.full((4,), 0.25))
        assert learned == (g.kind in scoring.MASKABLE_KINDS), g.describe()


def test_hywia_with_the_papers_two_granularities(env):
    from fxprune.scoring import HyWIA
    pair = HyWIA(steps=12, validate=False, granularities=("fine", "coarse"))
    res = hywia(env.dg, None, env.cal, ratio=0.25, seed=0, gradients=env.grads, settings=pair)
    levels = normalised_levels(env)
    for g in env.dg.groups:
        a = res.alpha[g.id]
        assert a.shape == (2,)
        close(res.scores[g.id], a[0] * levels["fine"][g.id] + a[1] * levels["coarse"][g.id], rtol=1e-5)
    validated = hywia(env.dg, None, env.cal, ratio=0.25, seed=0, gradients=env.grads,
                      settings=HyWIA(steps=12, granularities=("fine", "coarse")))
    assert set(validated.validation) == {"learned", "fine", "coarse"}
    # a saved config stores the tuple as a JSON list; it comes back equal
    from fxprune.scoring.methods import method_from_dict, method_to_dict
    assert method_from_dict(json.loads(json.dumps(method_to_dict(pair)))) == pair
    for bad in (("fine", "fine"), (), ("fine", "taylor"), "fine"):
        with pytest.raises(ValueError, match="HyWIA.granularities"):
            HyWIA(granularities=bad)


def test_hywia_on_activation_granularities_needs_no_gradient_pass(env, monkeypatch):
    from fxprune.scoring import HyWIA, hybrid
    from fxprune.scoring.activations import input_statistics

    def no_gradients(*args, **kwargs):
        raise AssertionError("the activation-aware granularities must not take the gradient pass")
    monkeypatch.setattr(hybrid, "gradients_for", no_gradients)
    inputs = input_statistics(env.dg, env.cal)
    settings = HyWIA(steps=3, granularities=("wanda", "flap"))
    res = hywia(env.dg, None, env.cal, ratio=0.25, settings=settings, inputs=inputs)
    again = hywia(env.dg, None, env.cal, ratio=0.25, settings=settings)  # statistics computed inside
    assert set(res.validation) == {"learned", "wanda", "flap"} and res.choice in res.validation
    assert all(torch.equal(res.scores[k], again.scores[k]) for k in res.scores)


def test_hywia_is_deterministic_for_a_seed(env, hy):
    again = hywia(env.dg, None, env.cal, ratio=0.25, steps=12, seed=0, gradients=env.grads, validate=False)
    assert all(torch.equal(hy.scores[k], again.scores[k]) for k in hy.scores)
    assert hy.losses == again.losses
    other = hywia(env.dg, None, env.cal, ratio=0.25, steps=12, seed=1, gradients=env.grads, validate=False)
    assert any(not torch.equal(hy.alpha[k], other.alpha[k]) for k in hy.alpha)
    validated = hywia(env.dg, None, env.cal, ratio=0.25, steps=12, seed=0, gradients=env.grads)
    via_score = score(env.dg, None, HyWIA(steps=12), env.cal, ratio=0.25, seed=0, gradients=env.grads)
    assert all(torch.equal(via_score[k], validated.scores[k]) for k in hy.scores)


def test_hywia_does_not_depend_on_how_the_calibration_is_batched(env):
    # The CLI passes calibration.split(4), the benchmarks the [N, L] tensor itself, fxprune.plan calls
    # hywia through score(): all must give the plan of the same samples (steps go one sample at a time).
    import fxprune
    from fxprune.planning.config import PruneConfig
    from fxprune.planning.plan import target_groups
    rows = torch.cat(env.cal)
    groups = target_groups(env.dg, PruneConfig(ratio=0.3, targets=("heads", "mlp")))
    ref = hywia(env.dg, groups, rows, ratio=0.3, steps=6, gradients=env.grads)
    for batching in (env.cal, list(rows.split(1)), [{"input_ids": rows}]):
        other = hywia(env.dg, groups, batching, ratio=0.3, steps=6)
        assert other.losses == pytest.approx(ref.losses, rel=1e-5)
        assert other.validation == pytest.approx(ref.validation, rel=1e-5)
        assert all(torch.allclose(other.scores[k], ref.scores[k], rtol=1e-5) for k in ref.scores)
    default_steps = hywia(env.dg, groups, rows, ratio=0.3, gradients=env.grads)
    via_plan = fxprune.plan(env.model, 0.3, importance="hywia", calibration=list(rows.split(3)), dg=env.dg,
                            reconstruct="none")
    direct = fxprune.plan(env.model, 0.3, scores=default_steps.scores, dg=env.dg, reconstruct="none")
    assert via_plan.units == direct.units and via_plan.params_after == direct.params_after


@pytest.mark.parametrize("seed,winner", [(0, "learned"), (1, "fine")])  # both outcomes, each on its seed
def test_validation_keeps_the_blend_that_prunes_with_the_lower_loss(env, seed, winner):
    res = hywia(env.dg, None, env.cal, ratio=0.25, steps=12, seed=seed, gradients=env.grads)
    assert set(res.validation) == {"learned", "fine", "coarse", "wanda", "flap"}
    assert res.choice == winner and res.validation[winner] == min(res.validation.values()), res.validation
    unvalidated = hywia(env.dg, None, env.cal, ratio=0.25, steps=12, seed=seed, gradients=env.grads, validate=False)
    assert all(torch.equal(res.learned[g.id], unvalidated.scores[g.id]) for g in env.dg.groups)
    if winner == "learned":
        scores, alpha = unvalidated.scores, unvalidated.alpha
    else:  # that granularity's ranking (normalised), and the attention reports its corner
        scores = res.levels[winner]
        alpha = {g.id: torch.tensor([float(k == winner) for k in res.granularities]) for g in env.dg.groups}
    assert all(torch.equal(res.scores[g.id], scores[g.id]) for g in env.dg.groups)
    assert all(torch.equal(res.alpha[g.id], alpha[g.id]) for g in env.dg.groups)


def test_the_validation_losses_are_those_of_the_pruned_models(env):
    # recompute the winner's loss through fxprune.apply
    import fxprune
    from fxprune.planning.config import PruneConfig
    from fxprune.planning.plan import target_groups
    groups = target_groups(env.dg, PruneConfig(ratio=0.4, targets=("heads", "mlp")))
    res = hywia(env.dg, groups, env.cal, ratio=0.4, steps=3, gradients=env.grads)
    best = min(res.validation.values())
    gm = fxprune.apply(env.model, fxprune.plan(env.model, 0.4, scores=res.scores, dg=env.dg), dg=env.dg)
    with torch.no_grad():
        # the held-out calibration rows (the last quarter), evaluated in chunks of up to 8
        ids = torch.cat(env.cal)
        ids = ids[ids.shape[0] - Calibration.of(ids).held_out_rows(0.25):]
        assert best == pytest.approx(float(scoring.lm_loss(gm(ids).logits, ids)), rel=1e-5)


def test_planned_fractions_are_what_the_uniform_planner_removes(env):
    import fxprune
    from fxprune.planning.config import PruneConfig
    from fxprune.planning.plan import target_groups
    for targets, ratio in ((("mlp",), 0.2), (("heads", "mlp"), 0.4)):  # the second needs the planner's top-up
        groups = target_groups(env.dg, PruneConfig(ratio=ratio, targets=targets))
        scores = {g.id: torch.rand(g.n_units, generator=torch.Generator().manual_seed(g.id)) for g in env.dg.groups}
        frac = scoring.planned_fractions(env.dg, groups, ratio, scores)
        plan = fxprune.plan(env.model, ratio, targets=targets, scores=scores, dg=env.dg)
        for g in groups:  # attention, embeddings and norms stay, so the groups lose more than `ratio` of their units
            assert frac[g.id] == pytest.approx(1 - len(plan.units.get(g.id, range(g.n_units))) / g.n_units)
        assert sum(frac[g.id] * g.n_units * g.params_per_unit for g in groups) > ratio * env.dg.num_parameters() * 0.98


def test_hard_relaxation_trains_on_the_pruned_model_itself(env):
    # The straight-through forward is the hard-pruned model: the first step's loss (equal attention
    # weights) is the LM loss of the model that fxprune.apply emits for the equal blend.
    import fxprune
    from fxprune.planning.config import PruneConfig
    from fxprune.planning.plan import target_groups
    targets, ratio = ("heads", "mlp"), 0.4  # units too coarse for one fraction: the planner tops up by score
    groups = target_groups(env.dg, PruneConfig(ratio=ratio, targets=targets))
    first = env.cal[:1]
    res = hywia(env.dg, groups, first, ratio=ratio, steps=1, gradients=env.grads)
    blend = {g.id: sum(res.levels[k][g.id] for k in res.granularities) / len(res.granularities) for g in groups}
    gm = fxprune.apply(env.model, fxprune.plan(env.model, ratio, targets=targets, scores=blend, dg=env.dg), dg=env.dg)
    with torch.no_grad():
        ids = first[0][:1]  # hywia steps over one sample at a time (batch_size=1)
        pruned_loss = float(scoring.lm_loss(gm(ids).logits, ids))
    assert res.losses[0] == pytest.approx(pruned_loss, rel=1e-5)
    soft = hywia(env.dg, groups, first, ratio=ratio, steps=1, gradients=env.grads, relaxation="soft")
    assert abs(soft.losses[0] - pruned_loss) > 1e-5 * pruned_loss  # the sigmoid mask is not the pruned model
    with pytest.raises(ValueError, match="relaxation"):
        hywia(env.dg, groups, first, ratio=ratio, steps=1, gradients=env.grads, relaxation="gumbel")


def test_output_projection_members(env):
    dg = env.dg
    assert [(m.name, m.dim) for m in scoring.output_projection_members(dg, group_of(dg, "mlp", 0))] == [
        ("model.layers.0.mlp.down_proj.weight", 1)]
    assert [(m.name, m.dim) for m in scoring.output_projection_members(dg, group_of(dg, "kv_groups", 0))] == [
        ("model.layers.0.self_attn.o_proj.weight", 1)]
    hidden = [g for g in dg.groups if g.kind == "hidden"][0]
    assert scoring.output_projection_members(dg, hidden) == []


# -- settings objects --------------------------------------------------------------------------------

def test_settings_and_their_shorthands_give_the_same_scores(env):
    from fxprune.scoring import Fisher, Magnitude, Random, Taylor, Vector
    pairs = [(Magnitude(p=1), "l1"), (Magnitude(p=2), "l2"), (Vector(), "vector"), (Taylor(order=1), "element1"),
             (Taylor(order=2), "element2"), (Taylor(order=2), "mix"), (Fisher(), "second")]
    for settings, name in pairs:
        a = score(env.dg, None, settings, env.cal, gradients=env.grads)
        b = score(env.dg, None, name, env.cal, gradients=env.grads)
        assert all(torch.equal(a[k], b[k]) for k in a), (settings, name)
    seeded = score(env.dg, None, Random(seed=3), seed=0)  # the settings carry their own seed
    by_name = score(env.dg, None, "random", seed=3)
    assert all(torch.equal(seeded[k], by_name[k]) for k in seeded)


def test_hywia_settings_are_fields_of_the_settings_not_keywords_of_score(env):
    from fxprune.scoring import HyWIA, as_method
    assert as_method("hywia") == HyWIA()  # the shorthand is the default settings
    with pytest.raises(TypeError, match="steps"):
        score(env.dg, None, "hywia", env.cal, ratio=0.25, steps=4)
    # the settings reach the optimiser (unvalidated: the validation may return the same corner for both)
    a = score(env.dg, None, HyWIA(steps=4, lr=0.1, validate=False), env.cal, ratio=0.25, gradients=env.grads)
    c = score(env.dg, None, HyWIA(steps=4, lr=0.5, validate=False), env.cal, ratio=0.25, gradients=env.grads)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_settings_are_frozen_and_validated():
    import dataclasses
    from fxprune.scoring import HyWIA, Magnitude, Random, Registered, Taylor
    for bad, what in ((lambda: Magnitude(p=3), "Magnitude.p"), (lambda: Taylor(order=0), "Taylor.order"),
                      (lambda: Taylor(order=True), "Taylor.order"), (lambda: Random(seed=1.5), "Random.seed"),
                      (lambda: HyWIA(steps=-1), "HyWIA.steps"), (lambda: HyWIA(lr=0), "HyWIA.lr"),
                      (lambda: HyWIA(relaxation="gumbel"), "HyWIA.relaxation"), (lambda: Registered(""), "name")):
        with pytest.raises(ValueError, match=what):
            bad()
    with pytest.raises(dataclasses.FrozenInstanceError):
        Taylor().order = 2
    with pytest.raises(ValueError, match="importance must be a name or a Method"):
        score(None, None, 3)


def test_a_settings_class_of_ones_own_selects_its_registered_estimator(env):
    from dataclasses import dataclass
    from fxprune.scoring import Method

    @dataclass(frozen=True)
    class Scaled(Method):
        factor: float = 2.0

        @property
        def estimator(self):
            return "test_scaled"

    seen = []

    @register_estimator("test_scaled")
    def scaled(stats):
        seen.append(stats.weight.shape)
        return stats.settings.factor * stats.reduce(stats.weight.pow(2))

    try:
        mlp = group_of(env.dg, "mlp", 0)
        got = score(env.dg, [mlp], Scaled(factor=3.0))[mlp.id]
        torch.testing.assert_close(got, 3.0 * score(env.dg, [mlp], "l2")[mlp.id])
        assert len(seen) == 3  # gate, up, down
    finally:
        ESTIMATORS.pop("test_scaled", None)
    with pytest.raises(ValueError, match="names estimator 'test_scaled', which is not registered"):
        score(env.dg, [mlp], Scaled())
