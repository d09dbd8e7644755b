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


def estimate(dg, groups, estimator, aggregation, grads: GradientStats | None, seed, device, settings=None,
             inputs=None, weights=None):
    """{group id: aggregated per-unit scores} of `estimator` over each group's members; `settings`: the
    `Method` that chose the estimator, handed to it in `UnitStats.settings`; `inputs`: InputStats by
    weight name; `weights`: where the members' tensors are read (name -> tensor; `dg.parameters` when None).
    A member the estimator returns None for carries no information and is skipped; a group with no
    informative member is scored by l2."""
    order = _first_use(dg) if aggregation == "last" else {}
    tensors = dg.parameters if weights is None else weights
    scores = {}
    for group in groups:
        values, uses = [], []
        for index, member in enumerate(group.members):
            if member.name not in dg.parameters:
                continue
            w = tensors[member.name].detach().to(device=device, dtype=torch.float32)
            stats = UnitStats(group, member, index, w,
                              grad=None if grads is None else grads.grad.get(member.name),
                              sq_grad=None if grads is None or grads.sq_grad is None else grads.sq_grad.get(member.name),
                              seed=seed, settings=settings,
                              inputs=None if inputs is None else inputs.get(member.name))
            v = estimator(stats)
            if v is None:
                continue
            if not isinstance(v, torch.Tensor) or v.shape != (group.n_units,):
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"estimator returned {got} for group {group.id} ({group.kind}); "
                                 f"expected a tensor of shape ({group.n_units},)")
            values.append(v.float())
            uses.append(order.get(member.name, -1))
        if not values:
            fallback = estimator is not ESTIMATORS["l2"] and inputs is not None
            scores[group.id] = estimate(dg, [group], ESTIMATORS["l2"], aggregation, None, seed, device,
                                       weights=weights)[group.id] \
                if fallback else torch.zeros(group.n_units)
            continue
        last = max(range(len(values)), key=lambda i: (uses[i], i))
        scores[group.id] = _aggregate(values, aggregation, last).detach().cpu()
    return scores
