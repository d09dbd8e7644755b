"""HyWIA's candidates judged after the plan's refit (fxprune/planning/refit_choice.py)."""
import dataclasses

import pytest
import torch

import fxprune
from fxprune.data.calibration import Calibration
from fxprune.util.lm import lm_loss
from fxprune.planning.plan import make_plan, target_groups
from fxprune.planning.refit_choice import choose_after_refit, held_out_loss
from fxprune.scoring import HyWIA, hywia, score
from tests.models import llama

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = HyWIA(steps=6, after_refit=True)


@pytest.fixture(scope="module")
def env():
    model = llama(seed=3)
    dg = fxprune.analyze(model)
    g = torch.Generator().manual_seed(4)
    cal = [torch.randint(0, 128, (4, 12), generator=g) for _ in range(2)]  # 8 rows: 6 fit the refit, 2 judge
    cfg = fxprune.PruneConfig(ratio=0.3, importance=SETTINGS, protect_layers=(), round_to=1)
    result = hywia(dg, target_groups(dg, cfg), cal, ratio=cfg.ratio, settings=dataclasses.replace(SETTINGS,
                                                                                                   validate=False))
    return model, dg, cal, cfg, result


def test_each_candidate_is_judged_by_its_refitted_model_on_the_held_out_rows(env):
    model, dg, cal, cfg, result = env
    candidates = result.candidates()
    assert set(candidates) == {"learned", "fine", "coarse", "wanda", "flap"}
    choice = choose_after_refit(dg, cfg, candidates, cal, holdout=0.25)
    assert set(choice.losses) == set(candidates)
    assert choice.losses[choice.name] == min(choice.losses.values())
    assert choice.scores is candidates[choice.name]
    rows = torch.cat(cal)
    fit, held = rows[:6], rows[6:]  # the last quarter is held out, as in HyWIA's own validation
    for name in ("learned", "flap"):  # the oracle: the public verbs, then the loss by hand
        plan = fxprune.plan(model, cfg, scores=candidates[name], calibration=fit, dg=dg)
        gm = fxprune.apply(model, plan, calibration=fit, dg=dg)
        with torch.no_grad():
            expected = float(lm_loss(gm(held).logits, held))
        assert choice.losses[name] == pytest.approx(expected, rel=1e-5)
    assert len({round(v, 6) for v in choice.losses.values()}) > 1  # the candidates do differ


def test_candidates_with_the_same_plan_share_one_refit(env, monkeypatch):
    import fxprune.planning.refit_choice as rv
    model, dg, cal, cfg, result = env
    calls = []
    monkeypatch.setattr(rv, "prune", lambda *a: calls.append(a) or model)
    learned = result.candidates()["learned"]
    same = {"learned": learned, "copy": {k: v * 2 for k, v in learned.items()}}  # a rescaling plans alike
    choice = choose_after_refit(dg, cfg, same, cal, holdout=0.25)
    assert len(calls) == 1 and choice.losses["copy"] == choice.losses["learned"] and choice.name == "learned"


def test_plan_uses_it_when_the_plan_refits_and_hywia_validates(env):
    model, dg, cal, cfg, result = env
    plan = fxprune.plan(model, cfg, calibration=cal, dg=dg)
    chosen = choose_after_refit(dg, cfg, result.candidates(), cal, holdout=SETTINGS.holdout)
    assert plan.units == make_plan(dg, cfg, chosen.scores).units
    # without the refit, or with after_refit=False, HyWIA's own (masked) validation decides, as score() does
    for changed in (dict(reconstruct="none"), dict(importance=dataclasses.replace(SETTINGS, after_refit=False))):
        other = dataclasses.replace(cfg, **changed)
        masked_settings = dataclasses.replace(other.importance, after_refit=False)  # score() has no refit to judge by
        masked = score(dg, target_groups(dg, other), masked_settings, cal, ratio=other.ratio)
        assert fxprune.plan(model, other, calibration=cal, dg=dg).units == make_plan(dg, other, masked).units


def test_held_out_loss_weighs_rows_by_their_target_tokens(env):
    model, *_ = env
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    with torch.no_grad():
        whole = float(lm_loss(model(ids, attention_mask=mask).logits, ids, mask))
    parts = held_out_loss(model, Calibration(ids, mask))
    assert parts == pytest.approx(whole, rel=1e-5)


def test_bad_settings_are_named_and_the_default_validates_masked():
    with pytest.raises(ValueError, match="HyWIA.after_refit"):
        HyWIA(after_refit="yes")
    assert HyWIA().after_refit is False and fxprune.PruneConfig().importance == "hywia"


def test_it_refuses_a_plan_without_refit(env):
    _, dg, cal, cfg, result = env
    with pytest.raises(ValueError, match="reconstruct mode 'none'"):
        choose_after_refit(dg, dataclasses.replace(cfg, reconstruct="none"), result.candidates(), cal, 0.25)
