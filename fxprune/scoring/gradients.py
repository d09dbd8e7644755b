"""Gradients of the calibration loss (and the squared per-sample gradients: the Fisher diagonal)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fxprune.analysis.groups import DependencyGraph
from fxprune.util.distributed import all_reduce_sums, local_share
from fxprune.util.lm import lm_loss
from fxprune.scoring.calibration import calibration_for
from fxprune.scoring.forward import compute_device, forward, model_tensors

@dataclass
class GradientStats:
    """Gradients of the calibration loss w.r.t. some parameters (float32, on the compute device)."""
    grad: dict[str, torch.Tensor]
    sq_grad: dict[str, torch.Tensor] | None
    n_samples: int
    loss: float

    def covers(self, names, second_order: bool) -> bool:
        """True when the stored gradients (and squared gradients when `second_order`) cover every name in `names`."""
        return all(n in self.grad for n in names) and (
            not second_order or (self.sq_grad is not None and all(n in self.sq_grad for n in names)))


def member_names(dg, groups) -> list[str]:
    """Names of the parameters the groups' members read, in order, without repeats."""
    return list(dict.fromkeys(m.name for g in groups for m in g.members if m.name in dg.parameters))


def compute_gradients(dg: DependencyGraph, calibration, names=None, second_order: bool = False,
                      batch_size: int = 1, device=None, dtype=None, checkpoint: bool = False) -> GradientStats:
    """Gradients of the causal LM loss on `calibration` w.r.t. the parameters `names` (default: all
    members of all groups). Only those parameters get gradient buffers.

    With `second_order`, each sample gets its own forward and backward pass, giving the squared
    per-sample gradients summed and divided by N (the Fisher diagonal); G is then the mean of the
    per-sample gradients. Otherwise samples go in chunks of `batch_size` rows.
    `checkpoint=True` (or an int: the number of segments) recomputes activations in backward,
    keeping only segment boundaries alive: less memory for about one more forward pass.
    Under a process group (`fxprune.util.distributed`) each rank runs its share of the batches and the
    sums are all-reduced before they are divided: every rank gets the one-process result.
    """
    calibration = calibration_for(dg, calibration, "gradient-based scoring")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    names = member_names(dg, dg.groups) if names is None else [n for n in names if n in dg.parameters]
    device = compute_device(dg, device)
    tensors = model_tensors(dg, device, dtype, trainable=set(names))
    inputs = [tensors[n] for n in names]
    # Float32 first-order sums accumulate in the tensors' own .grad: no second full set of gradients per pass
    in_place = not second_order and all(t.dtype == torch.float32 for t in inputs)
    grad = {} if in_place else {n: torch.zeros(tensors[n].shape, dtype=torch.float32, device=device) for n in names}
    sq = {n: torch.zeros_like(grad[n]) for n in names} if second_order else None
    n_samples, total = 0, 0.0
    for ids, mask in local_share(calibration.batches(1 if second_order else batch_size, device)):
        loss = lm_loss(forward(dg, tensors, ids, mask, checkpoint), ids, mask)
        rows = ids.shape[0]
        n_samples += rows
        total += float(loss.detach()) * rows
        if in_place:
            (loss * rows).backward(inputs=inputs)
            continue
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        for n, g in zip(names, grads):
            if g is None:
                continue
            g = g.float()
            grad[n].add_(g, alpha=rows)
            if sq is not None:
                sq[n].addcmul_(g, g)
    if in_place:
        grad = {n: tensors[n].grad if tensors[n].grad is not None else torch.zeros_like(tensors[n]).detach()
                for n in names}
    return gradient_stats(grad, sq, n_samples, total)


def gradient_stats(grad: dict, sq: dict | None, n_samples: int, total: float) -> GradientStats:
    """The `GradientStats` of row-weighted gradient sums `grad` (and squared ones `sq`) over `n_samples` rows
    whose losses sum to `total`, added up over the ranks first (the identity without a process group)."""
    sums = {("samples", ""): n_samples, ("loss", ""): total, **{("grad", n): g for n, g in grad.items()}}
    sums = all_reduce_sums({**sums, **{("sq", n): g for n, g in (sq or {}).items()}})
    n_samples, total = sums["samples", ""], sums["loss", ""]
    grad = {n: sums["grad", n] for n in grad}
    sq = {n: sums["sq", n] for n in sq} if sq is not None else None
    for n in grad:
        grad[n].div_(n_samples)
        if sq is not None:
            sq[n].div_(n_samples)
    return GradientStats(grad, sq, n_samples, total / n_samples)


def gradients_for(dg, groups, needs, method, calibration, gradients, batch_size, device, dtype, checkpoint):
    """Gradient statistics for the estimator's `needs`: the `gradients` given when they cover the groups, else
    computed on `calibration` (`ValueError` when there is none); None when no gradient is needed."""
    if not {"grad", "sq_grad"} & set(needs):
        return None
    names = member_names(dg, groups)
    second = "sq_grad" in needs
    if gradients is not None and gradients.covers(names, second):
        return gradients
    calibration = calibration_for(dg, calibration, f"method {method!r} (gradients of the LM loss)")
    return compute_gradients(dg, calibration, names, second_order=second, batch_size=batch_size,
                             device=device, dtype=dtype, checkpoint=checkpoint)
