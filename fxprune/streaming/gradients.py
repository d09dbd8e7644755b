"""Gradients of the LM loss through the streamed executor's backward sweep, finished layer by layer.

The same statistics as `scoring.gradients.compute_gradients`: G the mean over chunks of `batch_size` rows of
each chunk's loss gradient weighted by its rows, and with `second_order` every row its own chunk, the squared
per-row gradients summed and divided by the number of rows (the Fisher diagonal), float32 on the executor's
device. A tensor's statistics are complete once the sweep has passed the lowest segment reading it; they are
handed to a consumer then (`gradient_sweep`), which may reduce them to scores and let them go, so a sweep holds
one layer's gradients, never the model's (`streamed_gradient_scores`).
"""
from __future__ import annotations

from typing import Callable

import torch

from fxprune.scoring.aggregate import combine, fallback, first_uses, member_value
from fxprune.scoring.calibration import calibration_for
from fxprune.scoring.gradients import GradientStats, member_names
from fxprune.streaming.backward import backward_sweep
from fxprune.streaming.executor import StreamedExecutor
from fxprune.util.distributed import all_reduce_sums, local_share

# consume(name, tensor as read, mean gradient, mean squared per-row gradient or None)
Consumer = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor | None], None]


def gradient_sweep(executor: StreamedExecutor, calibration, names, second_order: bool, batch_size: int,
                   consume: Consumer) -> tuple[int, float]:
    """One backward sweep over this rank's share of `calibration`; each of `names` is handed to `consume` with its
    statistics (added up over the ranks) as soon as they are complete. Returns (rows, mean loss), over all ranks."""
    dg = executor.dg
    calibration = calibration_for(dg, calibration, "gradient-based scoring")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = local_share(calibration.batches(1 if second_order else batch_size))  # this rank's batches
    n_samples = all_reduce_sums({"rows": sum(ids.shape[0] for ids, _ in rows)})["rows"]
    grad: dict[str, torch.Tensor] = {}
    sq: dict[str, torch.Tensor] = {}

    def accumulate(name, batch, g):
        g = g.float()
        if name not in grad:
            grad[name] = torch.zeros_like(g)
            if second_order:
                sq[name] = torch.zeros_like(g)
        grad[name].add_(g, alpha=rows[batch][0].shape[0])
        if second_order:
            sq[name].addcmul_(g, g)

    def done(name, tensor):
        zero = lambda: torch.zeros(tensor.shape, dtype=torch.float32, device=executor.device)
        sums = {("grad", name): grad.pop(name, None)}
        sums[("grad", name)] = zero() if sums[("grad", name)] is None else sums[("grad", name)]
        if second_order:
            sums[("sq", name)] = sq.pop(name, None)
            sums[("sq", name)] = zero() if sums[("sq", name)] is None else sums[("sq", name)]
        sums = all_reduce_sums(sums)
        consume(name, tensor, sums["grad", name].div_(n_samples),
                sums["sq", name].div_(n_samples) if second_order else None)

    # a rank without a batch still walks the layers: the per-tensor reductions meet every rank's
    losses = backward_sweep(executor, rows, names, accumulate, on_done=done)
    total = all_reduce_sums({"loss": sum(loss * ids.shape[0] for loss, (ids, _) in zip(losses, rows))})["loss"]
    return n_samples, total / n_samples


def streamed_gradients(executor: StreamedExecutor, calibration, names=None, second_order: bool = False,
                       batch_size: int = 1) -> GradientStats:
    """Gradients of the causal LM loss on `calibration` w.r.t. the parameters `names` (default: all members of
    all groups) of the graph `executor` streams, all kept (the model's size in float32: for scoring a model
    larger than memory, `streamed_gradient_scores`); with `second_order`, also the squared per-row gradients."""
    dg = executor.dg
    names = member_names(dg, dg.groups) if names is None else [n for n in names if n in dg.parameters]
    grad, sq = {}, {} if second_order else None

    def keep(name, tensor, g, s):
        grad[name] = g
        if sq is not None:
            sq[name] = s

    n_samples, loss = gradient_sweep(executor, calibration, names, second_order, batch_size, keep)
    return GradientStats(grad, sq, n_samples, loss)


def streamed_gradient_scores(executor: StreamedExecutor, groups, estimator, calibration, second_order: bool,
                             batch_size: int, aggregation: str = "sum", seed: int = 0, settings=None):
    """`scoring.aggregate.estimate` of a gradient `estimator` for `groups`, each member estimated as soon as its
    tensor's gradients are complete and the gradients dropped then: {group id: Tensor[n_units]}."""
    dg = executor.dg
    members: dict[str, list] = {}
    for group in groups:
        for index, member in enumerate(group.members):
            if member.name in dg.parameters:
                members.setdefault(member.name, []).append((group, index))
    values: dict[int, dict[int, torch.Tensor]] = {g.id: {} for g in groups}

    def estimate_members(name, tensor, g, s):
        for group, index in members[name]:
            v = member_value(group, index, estimator, tensor, g, s, seed, settings, device=executor.device)
            if v is not None:
                values[group.id][index] = v

    gradient_sweep(executor, calibration, list(members), second_order, batch_size, estimate_members)
    order = first_uses(dg, aggregation)
    scores = {}
    for group in groups:
        scores[group.id] = combine(dg, group, values[group.id], aggregation, order)
        if scores[group.id] is None:
            scores[group.id] = fallback(dg, group, estimator, aggregation, seed, executor.device, None, None)
    return scores
