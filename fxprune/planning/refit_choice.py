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

from fxprune.planning.config import PruneConfig
from fxprune.defaults import calibration_batch
from fxprune.analysis.groups import DependencyGraph
from fxprune.util.lm import lm_loss, model_logits
from fxprune.planning.plan import make_plan
from fxprune.rewrite.emit import prune
from fxprune.data.calibration import batches, vocab_size
from fxprune.scoring.hybrid import split_rows


@dataclass
class RefitChoice:
    """The candidate ranking chosen after the refit: its `name` ("learned" or a granularity), its `scores` per
    group, and every candidate's held-out `losses`."""
    name: str                                  # "learned" or a granularity
    scores: dict[int, torch.Tensor]            # the chosen candidate's scores
    losses: dict[str, float]                   # held-out LM loss of every candidate's refitted model


def held_out_loss(gm, rows) -> float:
    """Mean LM loss of `gm` over the (ids, mask) batches `rows`, weighted by their target tokens."""
    total, count = 0.0, 0
    device = next(iter(gm.parameters())).device  # the pruned model lives where the model's weights do
    with torch.no_grad():
        for ids, mask in rows:
            ids, mask = ids.to(device), None if mask is None else mask.to(device)
            n = int((ids.shape[1] - 1) * ids.shape[0] if mask is None else mask[:, 1:].sum())
            total += float(lm_loss(model_logits(gm, ids, mask), ids, mask)) * n
            count += n
    return total / max(count, 1)


def choose_after_refit(dg: DependencyGraph, cfg: PruneConfig, candidates: dict[str, dict], calibration,
                       holdout: float) -> RefitChoice:
    """The candidate ranking whose plan, refitted on the training rows of `calibration`, has the lowest loss
    on its last `holdout` fraction of rows (the split HyWIA used). `candidates`: name -> scores, e.g.
    `HyWIAResult.candidates()`."""
    if cfg.reconstruct == "none":
        raise ValueError("choose_after_refit judges candidates after the plan's refit, but this config has "
                         "reconstruct='none'")
    train, held = split_rows(batches(calibration, vocab_size(dg)), holdout)
    held = held or train  # one calibration row (or holdout=0): judged on the rows it was fitted on, as HyWIA does
    fit = calibration_batch([{"input_ids": ids, "attention_mask": mask} for ids, mask in train])  # one padded batch
    losses, seen = {}, {}
    for name, scores in candidates.items():
        plan = make_plan(dg, cfg, scores)
        key = tuple(sorted((g, tuple(u)) for g, u in plan.units.items()))
        if key not in seen:
            seen[key] = held_out_loss(prune(dg, plan, fit), held)
            gc.collect()  # a GraphModule is freed only by the collector (its graph and nodes form cycles)
        losses[name] = seen[key]
    name = min(losses, key=lambda k: (losses[k], k != "learned"))
    return RefitChoice(name, candidates[name], losses)
