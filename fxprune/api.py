"""The public verbs: analyze, plan, apply, compile."""
from __future__ import annotations

import torch

from fxprune.analyze import analyze
from fxprune.config import PruneConfig
from fxprune.plan import PlanError, PrunePlan, fingerprint, make_plan, target_groups
from fxprune.rewrite import rewrite

PLAN_KEY = "fxprune.plan"
BASE_KEY = "fxprune.base"


def base_description(model) -> dict:
    cls = type(model)
    config = getattr(model, "config", None)
    config = config.to_dict() if hasattr(config, "to_dict") else {}  # save() needs a transformers config
    config.pop("quantization_config", None)
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if attn:  # to_dict() leaves it out; a rebuild must run the same attention code (Bloom has no sdpa)
        config["_attn_implementation"] = attn
    return {"architecture": f"{cls.__module__}.{cls.__qualname__}", "config": config}


def plan(model, ratio: float = 0.2, *, importance="l2", calibration=None, targets=("heads", "mlp"),
         protect_layers=None, round_to=None, example_inputs=None, scores=None, dg=None, **options) -> PrunePlan:
    """Choose the units to remove from `model` so that `ratio` of its parameters go.

    `scores` (group id -> tensor of unit scores) overrides `importance`; `dg` reuses an analysis.
    """
    cfg = PruneConfig(ratio=ratio, importance=importance, targets=targets, protect_layers=protect_layers,
                      round_to=round_to, **options)
    dg = dg or analyze(model, example_inputs)
    if scores is None:
        from fxprune.scoring import score
        scores = score(dg, target_groups(dg, cfg), method=cfg.importance, calibration=calibration,
                       aggregation=cfg.aggregation, seed=cfg.seed, ratio=cfg.ratio)
    result = make_plan(dg, cfg, scores)
    result._dg = dg
    return result


def apply(model, plan: PrunePlan, *, example_inputs=None, dg=None) -> torch.fx.GraphModule:
    """Emit the pruned GraphModule of `model` for `plan`; `model` itself is left unchanged."""
    dg = dg or getattr(plan, "_dg", None)
    if dg is None or dg.model is not model:
        dg = analyze(model, example_inputs)
    if fingerprint(dg) != plan.fingerprint:
        raise PlanError(f"this plan was made for another model (fingerprint {plan.fingerprint}, "
                        f"{type(model).__name__} has {fingerprint(dg)})")
    kept = {}
    for gid, units in plan.units.items():
        group = dg.groups[gid]
        if units and max(units) >= group.n_units:
            raise PlanError(f"plan keeps unit {max(units)} of group g{gid} which has {group.n_units} units")
        kept[group.atom_id] = units
    gm = rewrite(dg, kept)
    gm.meta[PLAN_KEY] = plan
    gm.meta[BASE_KEY] = base_description(model)  # what save() needs to rebuild the architecture
    return gm


def compile(model, ratio: float = 0.2, **options) -> torch.fx.GraphModule:
    """Prune `model` by `ratio` of its parameters: `apply(model, plan(model, ratio, **options))`."""
    p = plan(model, ratio, **options)
    return apply(model, p, dg=p._dg)
