"""HyWIA's validation when the plan refits: judge each candidate ranking by the model the user gets.

HyWIA's own validation (`fxprune.scoring.hybrid`) prunes with each candidate ranking (the learned blend and
each granularity alone) by masking output-projection columns, and keeps the one with the lowest LM loss on
held-out calibration rows. When the plan then refits the projections that lost inputs, that masked model is
not the one the user gets, and rankings differ in how much of their loss the refit takes back: two
candidates' masked order can reverse after the refit (a case: benchmarks/results/reconstruction_smollm2.md).
So here each candidate is planned with the plan's own settings, rewritten and refitted on the rows HyWIA
trained its attention on, and judged by the LM loss on the held-out rows, which neither the attention nor
the refit has seen. Candidates that plan the same units are pruned once; a tie goes to the learned blend.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

from fxprune.data.calibration import Calibration
from fxprune.planning.config import PruneConfig
from fxprune.analysis.groups import DependencyGraph
from fxprune.util.lm import mean_token_loss, model_logits
from fxprune.planning.plan import make_plan
from fxprune.reconstruction.pruned_model import prune
from fxprune.scoring.calibration import calibration_for
from fxprune.scoring.hybrid import VALIDATION_ROWS


@dataclass
class RefitChoice:
    """The candidate ranking chosen after the refit: its `name` ("learned" or a granularity), its `scores` per
    group, and every candidate's held-out `losses`."""
    name: str                                  # "learned" or a granularity
    scores: dict[int, torch.Tensor]            # the chosen candidate's scores
    losses: dict[str, float]                   # held-out LM loss of every candidate's refitted model


def held_out_loss(gm, rows: Calibration) -> float:
    """LM loss of `gm` on the calibration `rows`, every target token weighted alike (`lm.mean_token_loss`)."""
    device = next(iter(gm.parameters())).device  # the pruned model lives where the model's weights do
    with torch.no_grad():
        return mean_token_loss(lambda ids, mask: model_logits(gm, ids, mask), rows.batches(VALIDATION_ROWS, device))


def choose_after_refit(dg: DependencyGraph, cfg: PruneConfig, candidates: dict[str, dict], calibration,
                       holdout: float) -> RefitChoice:
    """The candidate ranking whose plan, refitted on the training rows of `calibration`, has the lowest loss
    on its last `holdout` fraction of rows (the split HyWIA used). `candidates`: name -> scores, e.g.
    `HyWIAResult.candidates()`."""
    if not cfg.reconstruct.enabled:
        raise ValueError("choose_after_refit judges candidates after the plan's refit, but this config has "
                         "reconstruct mode 'none'")
    calibration = calibration_for(dg, calibration, "choose_after_refit")
    train, held = calibration.split_holdout(calibration.held_out_rows(holdout))
    held = held or train  # one calibration row (or holdout=0): judged on the rows it was fitted on, as HyWIA does
    losses, seen = {}, {}
    for name, scores in candidates.items():
        plan = make_plan(dg, cfg, scores)
        key = tuple(sorted((g, tuple(u)) for g, u in plan.units.items()))
        if key not in seen:
            seen[key] = held_out_loss(prune(dg, plan, train), held)
            gc.collect()  # a GraphModule is freed only by the collector (its graph and nodes form cycles)
        losses[name] = seen[key]
    name = min(losses, key=lambda k: (losses[k], k != "learned"))
    return RefitChoice(name, candidates[name], losses)
