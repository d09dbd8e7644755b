"""The public verbs: analyze, plan, apply, compile."""
from __future__ import annotations

import dataclasses

import torch

from fxprune.analysis.analyze import analyze
from fxprune.data.calibration import Calibration
from fxprune.planning.config import PruneConfig
from fxprune.defaults import default_calibration, find_tokenizer, resolve_data
from fxprune.planning.plan import PlanError, PrunePlan, fingerprint, make_plan, target_groups
from fxprune.reconstruction.pruned_model import prune
from fxprune.analysis.meta_keys import BASE_KEY, PLAN_KEY



def base_description(model) -> dict:
    """What `save` needs to rebuild the unpruned architecture: the model's class path and its transformers config as
    a dict (attention implementation included, quantization settings left out)."""
    cls = type(model)
    config = getattr(model, "config", None)
    config = config.to_dict() if hasattr(config, "to_dict") else {}  # save() needs a transformers config
    config.pop("quantization_config", None)
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if attn:  # to_dict() leaves it out; a rebuild must run the same attention code (Bloom has no sdpa)
        config["_attn_implementation"] = attn
    return {"architecture": f"{cls.__module__}.{cls.__qualname__}", "config": config}


def config_from(ratio, config: PruneConfig | None, options: dict) -> PruneConfig:
    """One PruneConfig from `plan(model, 0.2, importance=...)`, `plan(model, cfg)` or `plan(model, config=cfg, ...)`:
    keyword options and a ratio given beside a config override its fields."""
    if isinstance(ratio, PruneConfig):
        if config is not None:
            raise ValueError("pass the PruneConfig once: positionally or as config=, not both")
        ratio, config = None, ratio
    if ratio is not None:
        options = {"ratio": ratio, **options}
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(PruneConfig)})
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; PruneConfig has {[f.name for f in dataclasses.fields(PruneConfig)]}")
    return dataclasses.replace(config, **options) if config is not None else PruneConfig(**options)


def _calibration(calibration) -> Calibration | None:
    """The user's calibration as one validated `Calibration` (None stays None): made once, here."""
    return None if calibration is None else Calibration.of(calibration)


def plan(model, ratio: float | PruneConfig | None = None, *, config: PruneConfig | None = None, calibration=None,
         tokenizer=None, scores=None, dg=None, example_inputs=None, gradients=None, device=None, dtype=None,
         checkpoint=False, **options) -> PrunePlan:
    """Choose the units to remove from `model` so that `ratio` of its parameters go.

    The settings are a `PruneConfig` (`config`, or positionally instead of the ratio) and/or its
    fields as keywords (`importance`, `targets`, `protect_layers`, `reconstruct=Refit(...)`, ...), which
    override the config's. `calibration`: token ids in any form `Calibration.of` accepts (a LongTensor
    [rows, seq], dicts with "input_ids", a list of them, a `Calibration`). Without it, the package's
    C4 sample is drawn with `tokenizer` (or the model's own, when fxprune can find it); with neither,
    data-hungry settings fall back to data-free ones with a warning, and the plan's config records
    what was used.
    `scores` (group id -> tensor of unit scores) overrides `importance`; `dg` reuses an analysis of
    `model`. `gradients` (a `compute_gradients` result), `device`, `dtype` and `checkpoint` are handed
    to the scorer as they are (see `fxprune.scoring.score`).
    """
    cfg = config_from(ratio, config, options)
    from fxprune.planning.refit_choice import choose_after_refit
    from fxprune.scoring import ESTIMATORS, HyWIA, as_method, hywia, score
    method = as_method(cfg.importance, ESTIMATORS, cfg.seed)  # a bad name fails before the analysis
    calibration = _calibration(calibration)
    cfg, batches = resolve_data(model, cfg, calibration, tokenizer, scored=scores is not None, draw=scores is None)
    dg = dg or analyze(model, example_inputs)
    if scores is None:
        method = as_method(cfg.importance, ESTIMATORS, cfg.seed)  # the data-free fallback, if it applied
        groups = target_groups(dg, cfg)
        common = dict(aggregation=cfg.aggregation, seed=cfg.seed, batch_size=cfg.batch_size, device=device,
                      dtype=dtype, checkpoint=checkpoint, gradients=gradients, ratio=cfg.ratio)
        if isinstance(method, HyWIA) and method.validate and method.after_refit and cfg.reconstruct.enabled:
            # HyWIA's candidates are judged after the refit this plan will get (fxprune/planning/refit_choice.py)
            result = hywia(dg, groups, batches, settings=dataclasses.replace(method, validate=False), **common)
            scores = choose_after_refit(dg, cfg, result.candidates(), batches, method.holdout).scores
        else:
            if isinstance(method, HyWIA):  # no refit to judge after: HyWIA's own masked validation
                method = dataclasses.replace(method, after_refit=False)
            scores = score(dg, groups, method=method, calibration=batches, **common)
    return make_plan(dg, cfg, scores)


def check_plan(dg, plan: PrunePlan) -> None:
    """Raise `PlanError` unless `plan` was made for the model `dg` analyses and keeps only units its groups have."""
    if fingerprint(dg) != plan.fingerprint:
        raise PlanError(f"this plan was made for another model (fingerprint {plan.fingerprint}, "
                        f"{type(dg.model).__name__} has {fingerprint(dg)})")
    for gid, units in plan.units.items():
        group = dg.groups[gid]
        if units and max(units) >= group.n_units:
            raise PlanError(f"plan keeps unit {max(units)} of group g{gid} which has {group.n_units} units")


def apply(model, plan: PrunePlan, *, calibration=None, tokenizer=None, example_inputs=None, dg=None,
          reconstruct: bool = True, verify: bool = True) -> torch.fx.GraphModule:
    """Emit the pruned GraphModule of `model` for `plan`; `model` itself is left unchanged.

    `dg`: the analysis of `model` the plan was made on (analysed again when missing or of another model).
    When the plan asks for reconstruction, the projections reading pruned dimensions are refitted on
    `calibration` (or `plan.config.reconstruct.samples` windows of the packaged sample); `reconstruct=False`
    skips it (fxprune.load does, since the saved weights are already refitted).
    The pruned graph is run before it is returned (`fxprune.rewrite.verify`: shapes on fake tensors, which also
    refreshes every node's `meta["val"]`, then a [2, 5] batch): where it fails, `GraphVerificationError`
    names the op, the node and the pruned groups there. `verify=False` leaves that to the caller
    (fxprune.load verifies once the saved weights are in).
    """
    if dg is None or dg.model is not model:
        dg = analyze(model, example_inputs)
    check_plan(dg, plan)
    # A plan that removes nothing has nothing to refit: it needs no calibration (PrunePlan.keep_all)
    refit = plan.config.reconstruct
    batches = None
    if reconstruct and plan.kept and refit.enabled:
        tok = find_tokenizer(model, tokenizer) if calibration is None else None
        batches = _calibration(calibration) if tok is None else default_calibration(tok, plan.config, refit.samples)
        if batches is None:
            raise PlanError(f"the plan asks for reconstruct mode {refit.mode!r}, which needs calibration: pass "
                            "calibration= (token ids) or tokenizer= to apply, or plan with reconstruct='none'")
    gm = prune(dg, plan, batches, check=verify)
    gm.meta[PLAN_KEY] = plan
    gm.meta[BASE_KEY] = base_description(model)  # what save() needs to rebuild the architecture
    return gm


def compile(model, ratio: float | PruneConfig | None = None, *, config: PruneConfig | None = None, calibration=None,
            tokenizer=None, dg=None, example_inputs=None, refit_calibration=None, **options) -> torch.fx.GraphModule:
    """Prune `model` by `ratio` of its parameters: one analysis handed to `plan` and `apply`.

    `calibration` is what scoring reads and, unless `refit_calibration` is given, what the reconstruction
    refits on; without either, each draws its own number of windows from the packaged sample."""
    cfg = config_from(ratio, config, options)
    calibration, refit_calibration = _calibration(calibration), _calibration(refit_calibration)
    cfg, batches = resolve_data(model, cfg, calibration, tokenizer, scored=False)
    dg = dg or analyze(model, example_inputs)
    pruning = plan(model, cfg, calibration=batches, dg=dg)
    refit = refit_calibration if refit_calibration is not None else calibration
    return apply(model, pruning, calibration=refit, tokenizer=tokenizer, dg=dg)

