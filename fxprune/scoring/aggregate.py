"""Per-member estimates combined into one score per unit of each group (`aggregation`)."""
from __future__ import annotations

import torch

from fxprune.analysis.groups import DependencyGraph, Group
from fxprune.scoring.estimators import ESTIMATORS, UnitStats
from fxprune.scoring.gradients import GradientStats

AGGREGATIONS = ("sum", "mean", "max", "prod", "last")


def _first_use(dg) -> dict[str, int]:
    """Position in the graph of the first op reading each parameter."""
    pos = {}
    nodes = list(dg.gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    for i, node in enumerate(nodes):
        names = []
        if node.op == "get_attr":
            names = [node.target]
            where = min((order[u] for u in node.users), default=i)
        elif node.op == "call_module":
            module = dg.gm.get_submodule(node.target)
            names = [f"{node.target}.{p}" for p, _ in module.named_parameters(remove_duplicate=False)]
            where = i
        for name in names:
            name = dg.aliases.get(name, name)
            pos[name] = min(pos.get(name, where), where)
    return pos


def resolve_groups(dg, groups) -> list[Group]:
    """The groups to score: all of `dg`'s when `groups` is None, else the given groups or group ids."""
    if groups is None:
        return list(dg.groups)
    if isinstance(groups, (Group, int)):
        groups = [groups]
    by_id = {g.id: g for g in dg.groups}
    out = []
    for g in groups:
        if isinstance(g, Group):
            out.append(g)
        elif isinstance(g, int) and g in by_id:
            out.append(by_id[g])
        else:
            raise ValueError(f"unknown group {g!r}: pass Group objects of this DependencyGraph or their ids")
    return out


def _aggregate(values: list[torch.Tensor], how: str, last: int) -> torch.Tensor:
    stacked = torch.stack(values)
    if how == "sum":
        return stacked.sum(0)
    if how == "mean":
        return stacked.mean(0)
    if how == "max":
        return stacked.amax(0)
    if how == "prod":
        return stacked.prod(0)
    return values[last]


def member_value(group: Group, index: int, estimator, weight: torch.Tensor, grad=None, sq_grad=None, seed: int = 0,
                 settings=None, inputs=None, device=None) -> torch.Tensor | None:
    """The estimate of `group.members[index]` (its tensor `weight`, its gradient statistics and input statistics):
    Tensor[n_units] in float32, or None when the estimator finds it uninformative."""
    member = group.members[index]
    w = weight.detach().to(device=device, dtype=torch.float32)
    v = estimator(UnitStats(group, member, index, w, grad=grad, sq_grad=sq_grad, seed=seed, settings=settings,
                            inputs=inputs))
    if v is None:
        return None
    if not isinstance(v, torch.Tensor) or v.shape != (group.n_units,):
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"estimator returned {got} for group {group.id} ({group.kind}); "
                         f"expected a tensor of shape ({group.n_units},)")
    return v.float()


def combine(dg, group: Group, values: dict[int, torch.Tensor], aggregation: str, order: dict[str, int]):
    """One score per unit of `group` from its members' estimates `values` (member index -> Tensor; None when no
    member was informative); `order`: `_first_use` positions, read by aggregation "last"."""
    indices = sorted(values)
    if not indices:
        return None
    uses = [order.get(group.members[i].name, -1) for i in indices]
    last = max(range(len(indices)), key=lambda k: (uses[k], k))
    return _aggregate([values[i] for i in indices], aggregation, last).detach().cpu()


def first_uses(dg, aggregation: str) -> dict[str, int]:
    """What `combine` reads for `aggregation`: the first-use positions for "last", nothing otherwise."""
    return _first_use(dg) if aggregation == "last" else {}


def estimate(dg, groups, estimator, aggregation, grads: GradientStats | None, seed, device, settings=None,
             inputs=None, weights=None):
    """{group id: aggregated per-unit scores} of `estimator` over each group's members; `settings`: the
    `Method` that chose the estimator, handed to it in `UnitStats.settings`; `inputs`: InputStats by
    weight name; `weights`: where the members' tensors are read (name -> tensor; `dg.parameters` when None).
    A member the estimator returns None for carries no information and is skipped; a group with no
    informative member is scored by l2."""
    order = first_uses(dg, aggregation)
    tensors = dg.parameters if weights is None else weights
    scores = {}
    for group in groups:
        values = {}
        for index, member in enumerate(group.members):
            if member.name not in dg.parameters:
                continue
            v = member_value(group, index, estimator, tensors[member.name],
                             grad=None if grads is None else grads.grad.get(member.name),
                             sq_grad=None if grads is None or grads.sq_grad is None else grads.sq_grad.get(member.name),
                             seed=seed, settings=settings, inputs=None if inputs is None else inputs.get(member.name),
                             device=device)
            if v is not None:
                values[index] = v
        scores[group.id] = combine(dg, group, values, aggregation, order)
        if scores[group.id] is None:
            scores[group.id] = fallback(dg, group, estimator, aggregation, seed, device, inputs, weights)
    return scores


def fallback(dg, group: Group, estimator, aggregation, seed, device, inputs, weights) -> torch.Tensor:
    """The scores of a group none of whose members informed `estimator`: l2 where statistics were given, else 0."""
    if estimator is not ESTIMATORS["l2"] and inputs is not None:
        return estimate(dg, [group], ESTIMATORS["l2"], aggregation, None, seed, device, weights=weights)[group.id]
    return torch.zeros(group.n_units)
