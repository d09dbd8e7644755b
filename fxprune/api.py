"""The public verbs: analyze, plan, apply, compile."""
from __future__ import annotations

import dataclasses

import torch

from fxprune.analyze import analyze
from fxprune.config import PruneConfig
from fxprune.defaults import calibration_batch, default_calibration, find_tokenizer, resolve_data
from fxprune.passes.reconstruct_layers import ReconstructLayersPass
from fxprune.plan import PlanError, PrunePlan, fingerprint, make_plan, target_groups
from fxprune.rewrite import rewrite

PLAN_KEY = "fxprune.plan"
BASE_KEY = "fxprune.base"


def base_description(model) -> dict:
    cls = type(model)
    config = getattr(model, "config", None)
    config = config.to_dict() if hasattr(config, "to_dict") else {}  # save() needs a transformers config
    config.pop("quantization_config", None)
    return {"architecture": f"{cls.__module__}.{cls.__qualname__}", "config": config}


def _config(ratio, config, options) -> PruneConfig:
    """Keyword settings on top of `config` (or the defaults); an explicit `ratio` wins over the config's."""
    if ratio is not None:
        options = {"ratio": ratio, **options}
    if config is None:
        return PruneConfig(**options)
    if not isinstance(config, PruneConfig):
        raise TypeError(f"config must be a fxprune.PruneConfig, got {type(config).__name__}")
    return dataclasses.replace(config, **options) if options else config


def plan(model, ratio: float | None = None, *, config: PruneConfig | None = None, calibration=None, tokenizer=None,
         example_inputs=None, scores=None, dg=None, **options) -> PrunePlan:
    """Choose the units to remove from `model` so that `ratio` of its parameters go.

    Settings come from `config` (a `PruneConfig`) or keyword arguments (`importance`, `targets`,
    `protect_layers`, `round_to`, `reconstruct`, ...). Without `calibration`, the package's C4 sample is
    drawn with `tokenizer` (or the model's own, when fxprune can find it); with neither, data-hungry
    settings fall back to data-free ones with a warning, and the plan records what was used.
    `scores` (group id -> tensor of unit scores) overrides `importance`; `dg` reuses an analysis.
    """
    cfg = _config(ratio, config, options)
    cfg, batches = resolve_data(model, cfg, calibration, tokenizer, scored=scores is not None, draw=scores is None)
    dg = dg or analyze(model, example_inputs)
    if scores is None:
        from fxprune.scoring import score
        scores = score(dg, target_groups(dg, cfg), method=cfg.importance, calibration=batches,
                       aggregation=cfg.aggregation, seed=cfg.seed, ratio=cfg.ratio)
    return make_plan(dg, cfg, scores)


def apply(model, plan: PrunePlan, *, calibration=None, tokenizer=None, example_inputs=None, dg=None,
          reconstruct: bool = True) -> torch.fx.GraphModule:
    """Emit the pruned GraphModule of `model` for `plan`; `model` itself is left unchanged.

    When the plan asks for reconstruction, the projections reading pruned dimensions are refitted on
    `calibration` (or the packaged sample, drawn as `plan` draws it); `reconstruct=False` skips it
    (fxprune.load does, since the saved weights are already refitted).
    """
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
    mode = plan.config.reconstruct if reconstruct else "none"
    if mode != "none":
        tok = find_tokenizer(model, tokenizer) if calibration is None else None
        batches = calibration if tok is None else default_calibration(tok, plan.config)
        if batches is None:
            raise PlanError(f"the plan asks for reconstruct={mode!r}, which needs calibration: pass calibration= "
                            "(token ids) or tokenizer= to apply, or plan with reconstruct='none'")
    gm = rewrite(dg, kept)
    if mode != "none":
        ReconstructLayersPass(dg.gm, dg.aliases, plan.kept, calibration_batch(batches), mode, plan.config.ridge)(gm)
    gm.meta[PLAN_KEY] = plan
    gm.meta[BASE_KEY] = base_description(model)  # what save() needs to rebuild the architecture
    return gm


def compile(model, ratio: float | None = None, *, config: PruneConfig | None = None, calibration=None, tokenizer=None,
            example_inputs=None, **options) -> torch.fx.GraphModule:
    """Prune `model` by `ratio` of its parameters: `apply(model, plan(model, ratio, ...))`, analysing once."""
    cfg = _config(ratio, config, options)
    cfg, batches = resolve_data(model, cfg, calibration, tokenizer, scored=False)
    dg = analyze(model, example_inputs)
    p = plan(model, config=cfg, calibration=batches, dg=dg)
    return apply(model, p, calibration=batches, dg=dg)
