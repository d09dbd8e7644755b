"""Activation-aware importance (FLAP's fluctuation, Wanda-sp), FLAP's allocation, and the data defaults."""
import warnings

import pytest
import torch

import fxprune
from fxprune.planning.plan import target_groups
from fxprune.scoring import score
from fxprune.scoring.activations import input_statistics
from models import llama
from tiny_tokenizer import tiny_tokenizer

CAL = torch.randint(1, 128, (6, 10), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def env():
    model = llama("sdpa")
    return model, fxprune.analyze(model)


def down_proj_inputs(model, layer):
    seen = []
    proj = model.model.layers[layer].mlp.down_proj
    h = proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(CAL)
    h.remove()
    return seen[0].double(), proj.weight.detach().double()


def mlp_group(dg, layer):
    return next(g for g in dg.groups if g.kind == "mlp" and g.layer == layer)


def test_statistics_are_those_of_the_projection_inputs(env):
    model, dg = env
    x, _ = down_proj_inputs(model, 1)
    stats = input_statistics(dg, CAL.split(4))["model.layers.1.mlp.down_proj.weight"]
    assert stats.dim == 1 and stats.tokens == x.shape[0]
    assert torch.allclose(stats.mean.double(), x.mean(0), atol=1e-6)
    assert torch.allclose(stats.var.double(), x.var(0), rtol=1e-4, atol=1e-9)
    assert torch.allclose(stats.sq_norm.double(), x.pow(2).sum(0), rtol=1e-5)


@pytest.mark.parametrize("method", ["flap", "wanda", fxprune.scoring.Fluctuation(), fxprune.scoring.Wanda()])
def test_mlp_channel_scores_match_the_formulas(env, method):
    model, dg = env
    x, w = down_proj_inputs(model, 0)
    group = mlp_group(dg, 0)
    got = score(dg, [group], method, calibration=CAL)[group.id].double()
    name = method if isinstance(method, str) else method.estimator
    expected = x.var(0) * w.pow(2).sum(0) if name == "flap" else (w.abs() * x.pow(2).sum(0).sqrt()).sum(0)
    assert torch.allclose(got, expected, rtol=1e-4)


def test_head_scores_sum_over_the_heads_channels(env):
    model, dg = env
    group = next(g for g in dg.groups if g.kind == "kv_groups" and g.layer == 0)
    seen = []
    proj = model.model.layers[0].self_attn.o_proj
    h = proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(CAL)
    h.remove()
    per_channel = seen[0].double().var(0) * proj.weight.detach().double().pow(2).sum(0)
    member = next(m for m in group.members if m.name == "model.layers.0.self_attn.o_proj.weight")
    expected = torch.zeros(group.n_units, dtype=torch.float64).index_add_(0, member.unit_of, per_channel)
    assert torch.allclose(score(dg, [group], "flap", calibration=CAL)[group.id].double(), expected, rtol=1e-4)


def test_activation_methods_need_calibration_and_say_so(env):
    _, dg = env
    with pytest.raises(ValueError, match="calibration"):
        score(dg, None, "flap")


def test_flap_allocation_standardises_per_group_and_meets_the_ratio(env):
    model, dg = env
    scores = score(dg, target_groups(dg, fxprune.PruneConfig(targets=("heads", "mlp"))), "flap", calibration=CAL)
    flap = fxprune.plan(model, 0.25, scores=scores, dg=dg, allocation="flap", reconstruct="none")
    assert abs(flap.removed_fraction - 0.25) <= 0.01
    # standardised per group: shifting or scaling one group's scores changes nothing (a mean-normalised
    # global ranking is moved by the shift)
    moved = {k: 3 * v + (10 * v.std() if dg.groups[k].kind == "mlp" and dg.groups[k].layer == 0 else 0)
             for k, v in scores.items()}
    assert fxprune.plan(model, 0.25, scores=moved, dg=dg, allocation="flap", reconstruct="none").units == flap.units
    plain = fxprune.plan(model, 0.25, scores=scores, dg=dg, allocation="global", reconstruct="none")
    assert fxprune.plan(model, 0.25, scores=moved, dg=dg, allocation="global", reconstruct="none").units != plain.units


def test_defaults_calibrate_on_the_packaged_sample_with_a_tokenizer():
    tok = tiny_tokenizer()
    model = llama("sdpa", vocab_size=len(tok))
    gm = fxprune.compile(model, 0.3, tokenizer=tok, calibration_samples=8, calibration_len=16)
    cfg = gm.meta[fxprune.PLAN_KEY].config
    defaults = fxprune.PruneConfig()
    assert (cfg.importance, cfg.reconstruct, cfg.protect_layers) == (defaults.importance, defaults.reconstruct, "auto")
    assert defaults.importance == "hywia"  # a data-hungry default: it ran on the packaged sample, not the fallback
    refit = fxprune.compile(model, 0.3, tokenizer=tok, calibration_samples=8, calibration_len=16, importance="flap",
                            reconstruct="lstsq")
    assert any(isinstance(m, torch.nn.Linear) and m.bias is not None for m in refit.modules())


def test_the_refit_draws_its_own_number_of_packaged_windows_unless_given_calibration(monkeypatch):
    from fxprune.reconstruction import reconstruct_layers
    seen = []
    original = reconstruct_layers.ReconstructLayersPass.__init__

    def record(self, dense_gm, aliases, kept, calibration, *args):
        seen.append(tuple(calibration.ids.shape))
        original(self, dense_gm, aliases, kept, calibration, *args)
    monkeypatch.setattr(reconstruct_layers.ReconstructLayersPass, "__init__", record)
    tok = tiny_tokenizer()
    model = llama("sdpa", vocab_size=len(tok))
    options = dict(tokenizer=tok, calibration_len=16, importance="flap", reconstruct="lstsq")
    fxprune.compile(model, 0.3, calibration_samples=4, **{**options, "reconstruct": fxprune.Refit(samples=6)})
    given = torch.randint(1, len(tok), (5, 16))
    fxprune.compile(model, 0.3, calibration=given, **options)
    fxprune.compile(model, 0.3, calibration=given, refit_calibration=given[:3], **options)
    assert seen == [(6, 16), (5, 16), (3, 16)]


def test_without_data_the_defaults_fall_back_with_a_warning(env):
    model, dg = env
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = fxprune.plan(model, 0.3, dg=dg)
    assert (plan.config.importance, plan.config.reconstruct.mode) == ("l2", "none")
    assert any("no calibration and no tokenizer" in str(w.message) for w in caught)


def test_unknown_importance_fails_before_the_analysis():
    class Untraceable(torch.nn.Module):
        def forward(self, *a, **k):
            raise AssertionError("analysed before the settings were checked")
    with pytest.raises(ValueError, match="nonsense"):
        fxprune.compile(Untraceable(), 0.2, importance="nonsense")


def test_auto_protection_and_rounding():
    from fxprune.planning.config import mlp_rounding, protected_layers
    assert protected_layers("auto", 30) == {0, 1, 2, 28, 29} and protected_layers("auto", 2) == set()
    assert mlp_rounding("auto", 1536) == 64 and mlp_rounding("auto", 96) is None and mlp_rounding(32, 96) == 32
