"""Importance of the prunable units of fxprune groups.

`score(dg, groups, method)` gives one value per unit of every group: a higher value means a more
important unit, one to keep. A method is frozen, validated settings (`methods`: `Magnitude(p=2)`,
`Taylor(order=1)`, `Vector()`, `Fisher()`, `Random(seed)`, `HyWIA(steps=30, ...)`) or a shorthand
string ("l2", "element1", "hywia", ...). Each settings class names the *estimator* of the registry
`ESTIMATORS` that computes it; `HyWIA` blends two of them with a learned attention (`hywia`).

An estimator scores the units of ONE member (one dimension of one parameter) of a group; `score`
then aggregates the per-member values over the group's members (`aggregation`: sum, mean, max,
prod, or last: the member used last in graph order, e.g. o_proj / down_proj / lm_head). An
estimator is a callable ``(stats: UnitStats) -> Tensor[n_units]``; register your own with
`register_estimator`. The built-in ones follow LLM-Pruner (Ma et al., 2023), with W the weight,
G the gradient of the calibration loss and H the diagonal Fisher approximation of the Hessian,
``H = sum_n g_n**2 / N`` over per-sample gradients g_n:

    random    uniform [0, 1) values, seeded by (seed, group id, member index)
    l1        sum over the unit of |W|
    l2        sum over the unit of W**2
    vector    |sum over the unit of W*G|                  (LLM-Pruner "vectorize", first order)
    element1  sum over the unit of |W*G|                  (LLM-Pruner "param_first")
    element2  sum over the unit of |W*G - 0.5*W*H*W|      (the paper's element-wise 2nd order)
    mix       the same as element2: LLM-Pruner's code names this formula "param_mix"
              (salience = W*G - 0.5*W*acc_grad*W); kept under both names
    second    sum over the unit of |W*H*W|                (LLM-Pruner "param_second")
    flap      sum over the unit of Var(x_j) * W_ij**2      (FLAP's fluctuation; activations, no backward)
    wanda     sum over the unit of |W_ij| * ||x_j||_2      (Wanda-sp; activations, no backward)
    obs       the projection's output error once the unit is removed and the other inputs refitted
              (structured optimal brain surgeon, greedy; `obs`; activations' Gram matrix, no backward)

flap, wanda and obs score a member only where it is the input dimension of a projection (x_j: that
projection's input channel j over the calibration tokens, `activations.input_statistics`).

The calibration loss is the causal LM loss (next-token cross entropy, mean over the target tokens
of a chunk of `batch_size` samples), averaged over chunks weighted by their number of samples: with
equal lengths and no padding this is the mean token loss over the whole calibration set, the loss
LLM-Pruner differentiates. G is its gradient (a mean, not a sum over batches, so that the first and
second order terms of element2 keep the same scale however many batches are given). The user's
model is never modified: gradients are taken with `torch.func.functional_call` on detached
tensors and `torch.autograd.grad`, so no ``.grad`` is ever set on the model's parameters.

The modules: `methods` (the settings), `estimators` (the registry and the per-member formulas),
`calibration` (the `fxprune.data.calibration.Calibration` a scorer reads, checked against the vocabulary),
`forward` (running the captured graph on detached tensors), `gradients` (G and the Fisher diagonal),
`aggregate` (members -> one score per unit), `hybrid` (HyWIA), and `dispatch` (`score`).

Adding an estimator: write ``fn(stats: UnitStats) -> Tensor[n_units]`` and decorate it with
``@register_estimator("name", needs=(...))``; "name" is then a shorthand. For typed settings, add a
frozen dataclass deriving from `Method` whose `estimator` property returns "name"; the estimator
reads its fields from ``stats.settings`` (validate them in ``__post_init__``). `needs` declares what
the estimator reads besides the weight; `score` computes each need once for all groups and hands it
on in `UnitStats`.

An estimator that needs activation statistics instead of gradients (Wanda-style |W| * ||X||): add
the kind to `estimators.NEEDS` (e.g. "activations"), a field on `UnitStats` for the statistic of the
member's input (e.g. `act_norm`, shaped to broadcast against `weight`), and a collector beside
`gradients.py` (e.g. `activations.py`: one forward pass of the calibration data through
`forward.forward`, recording the inputs of the nodes that read each member's parameter). Then make
`dispatch.score` call the collector when "activations" is in the estimator's needs, the way it calls
`gradients_for` for "grad", and pass the result into `aggregate.estimate`, which builds the
`UnitStats`. The estimator itself reads ``stats.need("act_norm")``.
"""
from __future__ import annotations

from fxprune.util.lm import lm_loss
from fxprune.scoring.aggregate import AGGREGATIONS
from fxprune.data.calibration import Calibration
from fxprune.scoring.dispatch import score
from fxprune.scoring.estimators import ESTIMATORS, NEEDS, UnitStats, register_estimator, unit_sum
from fxprune.scoring.gradients import GradientStats, compute_gradients
from fxprune.scoring.hybrid import (MASKABLE_KINDS, HyWIAResult, hywia, output_projection_members,
                                   planned_fractions)
from fxprune.scoring.methods import (HyWIA, OBS, Fluctuation, Magnitude, Method, Random, Registered, Taylor, Vector,
                                     Wanda, Fisher, as_method)

__all__ = ["ESTIMATORS", "AGGREGATIONS", "NEEDS", "UnitStats", "GradientStats", "HyWIAResult", "register_estimator",
           "unit_sum", "compute_gradients", "score", "hywia", "output_projection_members", "planned_fractions",
           "Method", "Fluctuation", "Wanda", "OBS", "Magnitude", "Taylor", "Vector", "Fisher", "Random", "Registered", "HyWIA", "as_method",
           "lm_loss", "Calibration", "MASKABLE_KINDS"]
