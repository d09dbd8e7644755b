"""The per-member estimators and their registry (`ESTIMATORS`, filled by `register_estimator`).

An estimator is a callable ``(stats: UnitStats) -> Tensor[n_units]`` scoring the units of ONE member
(one dimension of one parameter) of a group; the formulas are listed in `fxprune.scoring`'s docstring.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from fxprune.analysis.groups import Group, Member

ESTIMATORS: dict[str, Callable] = {}
# What an estimator may read besides the weight, filled by the scorer: loss gradient, Fisher diagonal,
# per-input-channel statistics of the projection fed, and that projection's input Gram matrix.
NEEDS = ("grad", "sq_grad", "inputs", "gram")


def unit_sum(x: torch.Tensor, dim: int, unit_of: torch.Tensor, n_units: int) -> torch.Tensor:
    """Per-unit sums of an elementwise tensor `x`: all positions of a unit along `dim`, all other dims.

    Positions whose `unit_of` is -1 belong to no unit and are ignored.
    """
    if x.shape[dim] != unit_of.numel():
        raise ValueError(f"unit_of has {unit_of.numel()} entries but dimension {dim} of the tensor "
                         f"has size {x.shape[dim]}")
    per_position = x.movedim(dim, 0).reshape(x.shape[dim], -1).sum(1)
    unit_of = unit_of.to(per_position.device)
    keep = unit_of >= 0
    out = per_position.new_zeros(n_units)
    return out.index_add_(0, unit_of[keep], per_position[keep])


@dataclass
class UnitStats:
    """What an estimator sees of one member of a group.

    `weight` is the member's tensor (float32, on the compute device; never modify it in place),
    `grad` the gradient of the calibration loss (or None if the estimator did not ask for it),
    `sq_grad` the mean over calibration samples of the squared per-sample gradients (or None),
    `settings` the `Method` the caller chose (a settings class of its own carries the estimator's options).
    """
    group: Group
    member: Member
    index: int                       # position of the member in group.members
    weight: torch.Tensor
    grad: torch.Tensor | None = None
    sq_grad: torch.Tensor | None = None
    seed: int = 0
    settings: object = None          # the Method that selected this estimator (its fields), if any
    inputs: object = None            # InputStats of the projection this member is the input dimension of

    @property
    def name(self) -> str:
        """The member's parameter name."""
        return self.member.name

    @property
    def dim(self) -> int:
        """The member's pruned dimension."""
        return self.member.dim

    @property
    def unit_of(self) -> torch.Tensor:
        """The unit of each position along the member's dimension (-1: none)."""
        return self.member.unit_of

    @property
    def n_units(self) -> int:
        """Number of units in the group."""
        return self.group.n_units

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum an elementwise tensor shaped like `weight` over each unit -> Tensor[n_units]."""
        return unit_sum(x, self.dim, self.unit_of, self.n_units)

    def need(self, what: str) -> torch.Tensor:
        """The statistic `what` ("grad", "sq_grad", ...); raises `ValueError` when the estimator did not declare it
        among its needs."""
        value = getattr(self, what)
        if value is None:
            raise ValueError(f"this estimator needs `{what}`; declare it with register_estimator(name, needs=...)")
        return value


def register_estimator(name: str, needs: Iterable[str] = ()):
    """Decorator: register `fn(stats: UnitStats) -> Tensor[n_units]` as estimator `name`.

    `needs` lists what the estimator reads besides the weight: "grad" and/or "sq_grad" (the latter
    costs one forward and backward pass per calibration sample).
    """
    needs = frozenset(needs)
    unknown = needs - set(NEEDS)
    if unknown:
        raise ValueError(f"unknown needs {sorted(unknown)}; known: {', '.join(map(repr, NEEDS))}")

    def wrap(fn):
        fn.needs = needs
        ESTIMATORS[name] = fn
        return fn
    return wrap


@register_estimator("random")
def _random(stats: UnitStats) -> torch.Tensor:
    seed = (int(stats.seed) * 1_000_003 + stats.group.id * 1_009 + stats.index) % (2 ** 63)
    return torch.rand(stats.n_units, generator=torch.Generator().manual_seed(seed)).to(stats.weight.device)


@register_estimator("l1")
def _l1(stats: UnitStats) -> torch.Tensor:
    return stats.reduce(stats.weight.abs())


@register_estimator("l2")
def _l2(stats: UnitStats) -> torch.Tensor:
    return stats.reduce(stats.weight.pow(2))


@register_estimator("vector", needs=("grad",))
def _vector(stats: UnitStats) -> torch.Tensor:
    return stats.reduce(stats.weight * stats.need("grad")).abs()


@register_estimator("element1", needs=("grad",))
def _element1(stats: UnitStats) -> torch.Tensor:
    return stats.reduce((stats.weight * stats.need("grad")).abs())


def _second_order(stats: UnitStats) -> torch.Tensor:
    w = stats.weight
    return w * stats.need("sq_grad") * w


@register_estimator("element2", needs=("grad", "sq_grad"))
def _element2(stats: UnitStats) -> torch.Tensor:
    return stats.reduce((stats.weight * stats.need("grad") - 0.5 * _second_order(stats)).abs())


@register_estimator("mix", needs=("grad", "sq_grad"))
def _mix(stats: UnitStats) -> torch.Tensor:
    # LLM-Pruner's "param_mix": salience = W*G - 0.5 * W*acc_grad*W, then |.| summed per unit.
    return _element2(stats)


@register_estimator("second", needs=("sq_grad",))
def _second(stats: UnitStats) -> torch.Tensor:
    return stats.reduce(_second_order(stats).abs())


# -- activation-aware estimators (no backward pass; see docs/reconstruction.md) ----------------------------
# They score a member only as a projection's input dimension; other members return None, which the
# aggregation skips, and a group no projection reads falls back to l2 (aggregate.estimate).

def _channel_view(stats: UnitStats, v: torch.Tensor) -> torch.Tensor:
    """A per-input-channel vector shaped to broadcast along the member's dimension of the weight."""
    shape = [1] * stats.weight.dim()
    shape[stats.dim] = -1
    return v.to(stats.weight.device).view(shape)


def _scored_input(stats: UnitStats):
    inputs = stats.inputs
    return inputs if inputs is not None and inputs.dim == stats.dim else None


@register_estimator("flap", needs=("inputs",))
def _flap(stats: UnitStats):
    """FLAP's fluctuation metric: per input channel j, the sample variance of x_j times ||W[:, j]||^2."""
    inputs = _scored_input(stats)
    if inputs is None:
        return None
    return stats.reduce(stats.weight.pow(2) * _channel_view(stats, inputs.var))


@register_estimator("wanda", needs=("inputs",))
def _wanda(stats: UnitStats):
    """Wanda-sp (structured Wanda, as in FLAP's baselines): sum over the unit of |W_ij| * ||X_j||_2."""
    inputs = _scored_input(stats)
    if inputs is None:
        return None
    return stats.reduce(stats.weight.abs() * _channel_view(stats, inputs.sq_norm.sqrt()))
