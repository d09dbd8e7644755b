"""Replay a plan on another capture of the same model (the KV-cache programs of `fxprune.generate`).

A plan is keyed by the original parameter names (`plan.kept`: name -> {dim: kept positions}); group
ids differ between captures. The kept units of each group of the new capture are read off its
parameter members, and the positions they imply for every parameter must equal the plan's exactly.
"""
from __future__ import annotations

import torch

from fxprune.analysis.groups import DependencyGraph
from fxprune.planning.plan import PlanError, PrunePlan
from fxprune.rewrite.emit import kept_positions


def units_of_member(group, member, positions) -> list[int]:
    """Sorted units of `member` that the kept `positions` along its dimension belong to."""
    units = member.unit_of[torch.as_tensor(positions, dtype=torch.long)]
    return sorted(set(units[units >= 0].tolist()))


def replay_kept(dg: DependencyGraph, plan: PrunePlan, original_name, what: str) -> dict[int, torch.Tensor]:
    """Atom id -> kept units for the groups of `dg` that `plan` prunes.

    `original_name` maps a parameter or buffer name of `dg` to the plan's (None: not the model's, a cache); `what`
    names the capture in errors. Raises PlanError when the new capture cannot express the plan: a
    pruned dimension it freezes (its frozen ops are listed), or groups that couple differently.
    """
    names = {n: original_name(n) for n in list(dg.parameters) + list(dg.buffers)}
    kept = {}
    for g in dg.groups:
        for m in g.members:
            positions = plan.kept.get(names.get(m.name), {}).get(m.dim)
            if positions is not None:
                units = units_of_member(g, m, positions)
                if len(units) < g.n_units:  # a dim shared with a pruned group (heads x head_dim) keeps all of g
                    kept[g.atom_id] = torch.tensor(units, dtype=torch.long)
                break
    implied = kept_positions(dg, kept)
    for name, original in names.items():
        if original is None:
            continue
        want = {d: list(p) for d, p in plan.kept.get(original, {}).items()}
        got = {d: p.tolist() for d, p in implied.get(name, {}).items()}
        if want != got:
            frozen = "; ".join(f"{n} ({op}): {why}" for n, op, why in dg.frozen_ops[:6]) or "none"
            raise PlanError(
                f"the plan cannot be replayed on {what}: parameter {original} keeps positions "
                f"{_brief(want)} in the plan but {_brief(got)} in this capture. Ops this capture froze: {frozen}")
    missing = sorted(set(plan.kept) - {o for o in names.values() if o is not None})
    if missing:
        raise PlanError(f"the plan prunes {missing[:3]}, which {what} does not read")
    return kept


def _brief(kept: dict) -> str:
    return "{" + ", ".join(f"dim {d}: {len(p)} kept" for d, p in sorted(kept.items())) + "}" if kept else "all"
