"""`streamed_gradients`: `scoring.gradients.compute_gradients` through the streamed executor's backward sweep.

The same statistics: G the mean over chunks of `batch_size` rows of each chunk's loss gradient weighted by its
rows, and with `second_order` every row its own chunk, the squared per-row gradients summed and divided by the
number of rows (the Fisher diagonal). Gradients are float32 on the executor's device.
"""
from __future__ import annotations

import torch

from fxprune.scoring.calibration import calibration_for
from fxprune.scoring.gradients import GradientStats, gradient_stats, member_names
from fxprune.streaming.backward import backward_sweep
from fxprune.streaming.executor import StreamedExecutor
from fxprune.util.distributed import local_share


def streamed_gradients(executor: StreamedExecutor, calibration, names=None, second_order: bool = False,
                       batch_size: int = 1) -> GradientStats:
    """Gradients of the causal LM loss on `calibration` w.r.t. the parameters `names` (default: all members of
    all groups) of the graph `executor` streams; with `second_order`, also the squared per-row gradients."""
    dg = executor.dg
    calibration = calibration_for(dg, calibration, "gradient-based scoring")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    names = member_names(dg, dg.groups) if names is None else [n for n in names if n in dg.parameters]
    rows = local_share(calibration.batches(1 if second_order else batch_size))  # this rank's batches
    device = executor.device
    grad = {n: torch.zeros(dg.parameters[n].shape, dtype=torch.float32, device=device) for n in names}
    sq = {n: torch.zeros_like(grad[n]) for n in names} if second_order else None

    def accumulate(name, batch, g):
        g = g.float()
        grad[name].add_(g, alpha=rows[batch][0].shape[0])
        if sq is not None:
            sq[name].addcmul_(g, g)

    losses = backward_sweep(executor, rows, names, accumulate) if rows else []
    n_samples = sum(ids.shape[0] for ids, _ in rows)
    total = sum(loss * ids.shape[0] for loss, (ids, _) in zip(losses, rows))
    return gradient_stats(grad, sq, n_samples, total)
