"""HyWIA through the streamed executor: its masked model run segment by segment.

A training step is a streamed forward and backward sweep (`backward_sweep`) whose weights are read through
the column masks (`transform`), so the gradient reaches the attention's learnables through the masks; a
validation is a streamed forward with the hard masks. The levels' gradients and input statistics are the
streamed ones, and the rest is `scoring.hybrid.hywia` itself: the same choice and scores as in memory.
"""
from __future__ import annotations

import torch

from fxprune.scoring.aggregate import resolve_groups
from fxprune.scoring.calibration import calibration_for
from fxprune.scoring.gradients import member_names
from fxprune.scoring.hybrid import HyWIAResult, MaskedObjective, check_arguments, hywia
from fxprune.scoring.methods import HyWIA
from fxprune.streaming.backward import backward_sweep
from fxprune.streaming.executor import SourceTensors, StreamedExecutor
from fxprune.streaming.gradients import streamed_gradients
from fxprune.streaming.statistics import streamed_input_statistics
from fxprune.util.lm import mean_token_loss


def masking(masks: dict[str, torch.Tensor]):
    """The transform reading each weight named in `masks` with its columns multiplied by that mask."""
    def transform(name, tensor):
        return tensor * masks[name].to(tensor.dtype) if name in masks else tensor
    return transform


class StreamedObjective(MaskedObjective):
    """HyWIA's masked model run by `executor`, the masks applied as each weight is read."""

    def __init__(self, executor: StreamedExecutor):
        self.executor = executor

    def step(self, masks, ids, mask):
        # the sweep differentiates into detached copies; their gradients then go back through the masks' graph
        leaves = {n: m.detach().requires_grad_(True) for n, m in masks.items()}
        (loss,) = backward_sweep(self.executor, [(ids, mask)], transform=masking(leaves), through=list(leaves))
        roots = [(masks[n], leaf.grad) for n, leaf in leaves.items() if leaf.grad is not None and masks[n].requires_grad]
        if roots:
            torch.autograd.backward([m for m, _ in roots], [g for _, g in roots])
        return loss

    def held_out(self, masks, batches):
        logits = iter(self.executor.run(batches, transform=masking({n: m.detach() for n, m in masks.items()})))
        return mean_token_loss(lambda ids, mask: next(logits), batches)


def streamed_hywia(executor: StreamedExecutor, groups=None, calibration=None, ratio: float = 0.2,
                   aggregation: str = "sum", seed: int = 0, batch_size: int = 1,
                   settings: HyWIA | None = None) -> HyWIAResult:
    """`scoring.hybrid.hywia` of the graph `executor` streams, with `settings` (default `HyWIA()`): the levels'
    gradients and statistics, the training steps and the validation all streamed."""
    dg, settings = executor.dg, settings or HyWIA()
    check_arguments(ratio, aggregation)
    calibration = calibration_for(dg, calibration, "hywia (it learns its attention on the LM loss)")
    groups = resolve_groups(dg, groups)
    names = member_names(dg, groups)
    kinds = set(settings.granularities)
    grads = streamed_gradients(executor, calibration, names, False, batch_size) if {"fine", "coarse"} & kinds else None
    inputs = streamed_input_statistics(executor, calibration, names) if {"wanda", "flap"} & kinds else None
    return hywia(dg, groups, calibration, ratio=ratio, aggregation=aggregation, seed=seed, batch_size=batch_size,
                 device=executor.device, gradients=grads, settings=settings, inputs=inputs,
                 weights=SourceTensors(executor), objective=StreamedObjective(executor))
