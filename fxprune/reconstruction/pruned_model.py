"""The pruned model of a plan: the rewrite, its verification, then the refit the plan asks for."""
from __future__ import annotations

import torch

from fxprune.analysis.groups import DependencyGraph
from fxprune.data.calibration import Calibration
from fxprune.reconstruction.reconstruct_layers import ReconstructLayersPass
from fxprune.rewrite.emit import rewrite, run_passes
from fxprune.rewrite.verify import verify


def prune(dg: DependencyGraph, plan, calibration: Calibration | None = None, check: bool = True) -> torch.fx.GraphModule:
    """The pruned GraphModule of `plan` (a checked `PrunePlan` of `dg`), refitted on `calibration` when given and
    the plan asks for reconstruction (ReconstructLayersPass, under the rewrite's graph checks). `check`: run it on
    fake and on real tensors first (fxprune.rewrite.verify), so a graph that fails is never refitted nor returned."""
    kept = {dg.groups[gid].atom_id: units for gid, units in plan.units.items()}
    gm = rewrite(dg, kept)
    if check:
        verify(gm, dg, plan)
    settings = plan.config.reconstruct
    if calibration is not None and settings.enabled and plan.kept:
        gm = run_passes(gm, [ReconstructLayersPass(dg.gm, dg.aliases, plan.kept, calibration, settings)])
    return gm
