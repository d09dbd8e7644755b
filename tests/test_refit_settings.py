"""Refit: the reconstruction stage's typed settings, their JSON in a plan, old plan files, and the pass contract."""
import json
from pathlib import Path

import pytest
import torch

import fxprune
from fxprune.data.calibration import Calibration
from fxprune.planning.config import PruneConfig
from fxprune.analysis.contracts import ContractError
from fxprune.reconstruction.reconstruct_layers import ReconstructLayersPass
from fxprune.reconstruction.settings import Refit
from fxprune.scoring import HyWIA, score
from models import llama
from oracles import random_scores

OLD_PLAN = Path(__file__).parent / "fixtures" / "plan_before_refit_settings.json"  # written before Refit existed
OLD_SETTINGS = Refit(mode="bias", ridge=0.1, weighting="uniform", target="output", precision="bfloat16", samples=7)
CAL = torch.randint(1, 128, (8, 12), generator=torch.Generator().manual_seed(5))  # what the old plan was made with


@pytest.fixture(scope="module")
def analysed():
    model = llama("sdpa")
    return model, fxprune.analyze(model)


@pytest.mark.parametrize("field,value", [("mode", "ols"), ("weighting", "sink"), ("target", "logits"),
                                         ("precision", "float16"), ("ridge", -1), ("ridge", True), ("ridge", "big"),
                                         ("samples", 0), ("samples", 2.5)])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"Refit.{field} must be"):
        Refit(**{field: value})


def test_a_mode_name_is_shorthand_for_the_settings():
    assert PruneConfig().reconstruct == Refit() and Refit().mode == "lstsq"
    assert PruneConfig(reconstruct="bias").reconstruct == Refit(mode="bias")
    assert not PruneConfig(reconstruct="none").reconstruct.enabled
    with pytest.raises(TypeError):
        PruneConfig(ridge=0.1)  # the flat fields are gone: Refit(ridge=0.1)


def test_refit_settings_survive_the_plan_json(analysed):
    model, dg = analysed
    refit = Refit(mode="bias", ridge=0.3, weighting="uniform", target="output", precision="bfloat16", samples=9)
    plan = fxprune.plan(model, 0.3, scores=random_scores(dg), dg=dg, reconstruct=refit, calibration=CAL)
    assert json.loads(plan.to_json())["config"]["reconstruct"] == refit.to_dict()
    again = fxprune.PrunePlan.from_json(plan.to_json())
    assert again.config.reconstruct == refit and again.config == plan.config
    with pytest.raises(ValueError, match=r"Refit has no setting\(s\) \['rigde'\]"):
        PruneConfig.from_dict({**plan.config.to_dict(), "reconstruct": {"rigde": 1.0}})


def test_an_old_plan_file_loads_with_its_flat_fields_as_one_refit(analysed):
    model, dg = analysed
    old = fxprune.PrunePlan.from_json(OLD_PLAN.read_text())
    assert old.config.reconstruct == OLD_SETTINGS
    # the same inputs give the same plan and the same refitted weights as when the file was written
    again = fxprune.plan(model, 0.3, targets=("mlp",), scores=random_scores(dg, 1), dg=dg, allocation="global",
                         importance="l2", reconstruct=OLD_SETTINGS, calibration=CAL)
    assert (again.units, again.kept, again.params_after) == (old.units, old.kept, old.params_after)
    assert again.config == old.config
    a, b = (fxprune.apply(model, p, calibration=CAL, dg=dg) for p in (old, again))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_the_pass_requires_lifted_projections_and_runs_under_the_graph_checks(analysed, monkeypatch):
    model, dg = analysed
    with pytest.raises(ContractError, match="runs after LiftLinearModulesPass"):
        ReconstructLayersPass(dg.gm, dg.aliases, {}, Calibration.of(CAL)).requires(dg.gm)
    with pytest.raises(TypeError, match="calibration must be a Calibration"):
        ReconstructLayersPass(dg.gm, dg.aliases, {}, CAL)
    import fxprune.rewrite.emit as rewrite
    from fxprune.reconstruction.pruned_model import prune
    checked = []
    real = rewrite.check_graph
    monkeypatch.setattr(rewrite, "check_graph", lambda gm: checked.append(gm) or real(gm))
    plan = fxprune.plan(model, 0.3, scores=random_scores(dg), dg=dg, reconstruct="bias", calibration=CAL)
    before = len(checked)
    prune(dg, plan, None)  # no calibration: the rewrite's passes only
    rewrite_checks = len(checked) - before
    prune(dg, plan, Calibration.of(CAL))
    assert len(checked) - before - rewrite_checks == rewrite_checks + 2  # the refit: checked before and after


def test_score_refuses_hywia_after_refit_instead_of_ignoring_it(analysed):
    _, dg = analysed
    with pytest.raises(ValueError, match=r"after_refit=True\) judges its candidates after the plan's refit, which "
                                         r"only fxprune\.plan makes"):
        score(dg, None, HyWIA(steps=1, after_refit=True), CAL)
