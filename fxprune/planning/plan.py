"""Planning: choose which units to remove so the parameter count drops by `ratio`."""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field

import torch

from fxprune.planning.config import PruneConfig, mlp_rounding, protected_layers
from fxprune.analysis.groups import DependencyGraph
from fxprune.scoring.hybrid import register_planner

KINDS_FOR_TARGET = {"mlp": ("mlp",), "hidden": ("hidden",), "experts": ("experts",)}
TOLERANCE = 0.01  # absolute, on the fraction of parameters removed


class PlanError(ValueError):
    """Raised when no plan can meet the request: no prunable group for the targets, or a ratio the structure cannot
    reach within tolerance; the message lists the frozen ops."""
    pass


def fingerprint(dg: DependencyGraph) -> str:
    """A hash of the model's parameter shapes and groups, so a plan refuses to apply to a model it was not made for."""
    h = hashlib.sha256()
    for name, t in dg.parameters.items():
        h.update(f"{name}:{tuple(t.shape)};".encode())
    for g in dg.groups:
        h.update(f"{g.kind}:{g.n_units}:{g.layer};".encode())
    return h.hexdigest()[:16]


@dataclass
class PrunePlan:
    """What to keep, for one model: the `config` it was made with, the kept `units` per group id, the `kept`
    positions per original parameter name and dimension, `params_before` / `params_after`, the model's
    `fingerprint`, the kinds of the planned `groups` and the `renormalising` ones among them. `to_json` /
    `from_json` round-trip it."""
    config: PruneConfig
    units: dict[int, list[int]]            # group id -> kept unit indices
    kept: dict[str, dict[int, list[int]]]  # parameter name -> {dim: kept positions}
    params_before: int
    params_after: int
    fingerprint: str
    groups: dict[int, str] = field(default_factory=dict)  # group id -> kind, for readers
    # Renormalising groups of the targeted kinds (Group.renormalising): pruned when config.renormalising
    # is "allow" (the pruned model is then not the zero-masked original), left whole when "exclude".
    renormalising: list[int] = field(default_factory=list)

    @property
    def removed_fraction(self) -> float:
        """Fraction of the parameters the plan removes."""
        return 1 - self.params_after / self.params_before

    def to_json(self) -> str:
        """The plan as JSON text (what `fxprune.save` writes as plan.json)."""
        return json.dumps({
            "config": self.config.to_dict(), "units": {str(k): v for k, v in self.units.items()},
            "kept": {n: {str(d): v for d, v in dims.items()} for n, dims in self.kept.items()},
            "params_before": self.params_before, "params_after": self.params_after,
            "fingerprint": self.fingerprint, "groups": {str(k): v for k, v in self.groups.items()},
            "renormalising": self.renormalising,
        }, indent=1)

    @classmethod
    def keep_all(cls, dg: DependencyGraph) -> "PrunePlan":
        """A plan that removes nothing: `apply` then gives the dense model as a fxprune program (a baseline
        for speed and numerics, e.g. the dense model's KV-cache generation)."""
        n = dg.num_parameters()
        return cls(PruneConfig(reconstruct="none"), {}, {}, n, n, fingerprint(dg))

    @classmethod
    def from_json(cls, text: str) -> "PrunePlan":
        """Rebuild a plan from `to_json`'s text."""
        d = json.loads(text)
        return cls(PruneConfig.from_dict(d["config"]), {int(k): v for k, v in d["units"].items()},
                   {n: {int(k): v for k, v in dims.items()} for n, dims in d["kept"].items()},
                   d["params_before"], d["params_after"], d["fingerprint"],
                   {int(k): v for k, v in d.get("groups", {}).items()}, list(d.get("renormalising", [])))


def target_groups(dg: DependencyGraph, cfg: PruneConfig, renormalising: bool | None = None):
    """The groups `cfg` may prune; `renormalising=True` gives those of them that renormalise
    (whatever cfg.renormalising says), False those that do not, None what cfg allows."""
    kinds = set()
    for t in cfg.targets:
        if t == "heads":
            kinds |= {"heads", "kv_groups" if cfg.gqa == "groups" else "group_heads"}
        else:
            kinds |= set(KINDS_FOR_TARGET[t])
    n_layers = len(dg.attention_ops)
    protect = protected_layers(cfg.protect_layers, n_layers)
    groups = [g for g in dg.groups if g.kind in kinds and not (g.kind != "hidden" and g.layer in protect)]
    if renormalising is None:
        renormalising = None if cfg.renormalising == "allow" else False
    return groups if renormalising is None else [g for g in groups if g.renormalising == renormalising]


def kept_count(n: int, fraction: float, round_to: int | None, minimum: int = 1) -> int:
    """Units of `n` left after removing `fraction` of them, at least `minimum`, rounded to a multiple of `round_to`
    when the group is at least that wide."""
    keep = max(minimum, n - math.floor(fraction * n + 1e-9))
    if round_to and n >= round_to:
        keep = max(round_to, minimum, int(round(keep / round_to)) * round_to)
    return min(keep, n)


def select(dg: DependencyGraph, groups, scores, cfg: PruneConfig) -> dict[int, int]:
    """Kept unit count per group so that the removed fraction is closest to cfg.ratio."""
    total = dg.num_parameters()
    target = cfg.ratio * total

    def removed(counts):
        return total - dg.count_parameters({g.atom_id: c for g, c in zip(groups, counts)})

    if cfg.uniform_widths:
        return dict(zip((g.id for g in groups), same_width_counts(groups, removed, target, TOLERANCE * total / 2, cfg)))
    if cfg.allocation == "uniform":
        def counts_at(f):
            return [kept_count(g.n_units, f, mlp_rounding(cfg.round_to, g.n_units) if g.kind == "mlp" else None,
                               g.min_units) for g in groups]
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if removed(counts_at(mid)) < target else (lo, mid)
        best = min((counts_at(lo), counts_at(hi)), key=lambda c: abs(removed(c) - target))
        if abs(removed(best) - target) > TOLERANCE * total / 2:
            # Units too coarse for one fraction (tiny models, heads of 1-2% each): top up the
            # fraction just below the target with the globally least important units.
            best = global_counts(groups, scores, removed, target, TOLERANCE * total / 2, start=counts_at(lo),
                                 rounds=rounding_steps(groups, cfg))
    else:
        best = global_counts(groups, scores, removed, target, TOLERANCE * total / 2,
                             scale=GLOBAL_SCALES[cfg.allocation],
                             rounds=rounding_steps(groups, cfg))
    return dict(zip((g.id for g in groups), best))


def same_width_counts(groups, removed, target, slack, cfg):
    """One kept count per kind, the same in every layer (a config with one width per kind can hold
    the result). The fraction is bisected as in the uniform allocation; where units are too coarse,
    whole columns (one unit of a kind in every layer) are removed, the move that lands closest to the
    target first. Which units go is still decided by importance, in make_plan."""
    kinds = sorted({g.kind for g in groups})
    for kind in kinds:
        sizes = {g.n_units for g in groups if g.kind == kind}
        if len(sizes) > 1:
            raise PlanError(f"uniform_widths: the model's {kind} groups already differ in size {sorted(sizes)}")

    def counts_for(per_kind):
        return [per_kind[g.kind] for g in groups]

    def per_kind_at(f):
        first = {g.kind: g for g in reversed(groups)}
        return {k: kept_count(first[k].n_units, f, mlp_rounding(cfg.round_to, first[k].n_units) if k == "mlp" else None,
                              first[k].min_units) for k in kinds}
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if removed(counts_for(per_kind_at(mid))) < target else (lo, mid)
    per_kind = min((per_kind_at(lo), per_kind_at(hi)), key=lambda c: abs(removed(counts_for(c)) - target))
    minimum = {g.kind: g.min_units for g in groups}
    while abs(removed(counts_for(per_kind)) - target) > slack:
        moves = [{**per_kind, k: per_kind[k] + step} for k in kinds for step in (-1, 1)
                 if minimum[k] <= per_kind[k] + step <= next(g.n_units for g in groups if g.kind == k)]
        best = min(moves, key=lambda c: abs(removed(counts_for(c)) - target), default=None)
        if best is None or abs(removed(counts_for(best)) - target) >= abs(removed(counts_for(per_kind)) - target):
            break  # make_plan reports the ratio it could not meet
        per_kind = best
    return counts_for(per_kind)


def rounding_steps(groups, cfg: PruneConfig) -> list[int]:
    """Per group, the multiple its kept count must stay at (1: any count): round_to for MLP groups."""
    steps = []
    for g in groups:
        multiple = mlp_rounding(cfg.round_to, g.n_units) if g.kind == "mlp" else None
        steps.append(multiple if multiple and g.n_units >= multiple else 1)
    return steps


def step_down(count: int, multiple: int) -> int:
    """The next smaller kept count that is a multiple of `multiple`."""
    return (count - 1) // multiple * multiple


# How global_counts puts each allocation's scores of different groups on one scale.
GLOBAL_SCALES = {"global": "mean", "flap": "standardise", "absolute": "per_parameter"}


def global_counts(groups, scores, removed, target, slack, start=None, scale="mean", rounds=None):
    """Kept units per group, removing units by one ranking over all of them until `removed(counts)` reaches `target`.

    `scale`: "mean" (score over its group's mean), "standardise" (FLAP's standardised scores) or "per_parameter"
    (scores already on one scale). A unit that would overshoot by more than `slack` is skipped, so a late
    head gives way to channels; a group rounded to `rounds[i]` gives units up a whole block at a time."""
    counts = list(start) if start is not None else [g.n_units for g in groups]
    rounds = rounds or [1] * len(groups)
    floors = [max(g.min_units, r) if r > 1 else g.min_units for g, r in zip(groups, rounds)]
    ranked = []
    for i, g in enumerate(groups):
        s = scores[g.id].double()
        if scale == "standardise":
            std = s.std().clamp_min(1e-12) if s.numel() > 1 else 1.0
            s = ((s - s.mean()) / std).sort().values
        elif scale == "per_parameter":
            s = (s / g.params_per_unit).sort().values
        else:
            s = (s / (s.abs().mean() + 1e-12)).sort().values
        count, first = counts[i], g.n_units - counts[i]  # s[first:]: the units not yet removed
        while step_down(count, rounds[i]) >= floors[i]:
            block = count - step_down(count, rounds[i])
            ranked.append((float(s[first:first + block].mean()), i))
            first, count = first + block, count - block
    ranked.sort()
    done = removed(counts)
    skipped, taken = [], []
    for _, i in ranked:
        if done >= target:
            break
        if step_down(counts[i], rounds[i]) < floors[i]:
            continue
        before, counts[i] = counts[i], step_down(counts[i], rounds[i])
        trial = removed(counts)
        if trial > target + slack:
            counts[i] = before
            skipped.append(i)
        else:
            done = trial
            taken.append((i, before - counts[i]))
    if done < target - slack:
        counts = make_room(counts, skipped, taken, removed, target, slack, floors, rounds)
    return counts


def make_room(counts, skipped, taken, removed, target, slack, floors, rounds):
    """A coarse unit skipped for overshooting may still fit if the most important of the finer
    units taken before it are given back (a 12% KV group plus 8% of MLP channels, not 17% of MLP).
    `taken`: (group index, units the step removed), in the order taken."""
    for i in skipped:
        trial = list(counts)
        if step_down(trial[i], rounds[i]) < floors[i]:
            continue
        trial[i] = step_down(trial[i], rounds[i])
        for j, units in reversed(taken):  # give back the most important first
            if removed(trial) <= target + slack:
                break
            trial[j] += units
        if abs(removed(trial) - target) <= slack:
            return trial
    return counts

def renormalising_note(dg: DependencyGraph, cfg: PruneConfig) -> list[int]:
    """Ids of the targeted groups that renormalise; warns the user what that means for this plan."""
    found = target_groups(dg, cfg, renormalising=True)
    if found:
        names = ", ".join(f"g{g.id} ({g.kind}, layer {g.layer}, by {g.renormalised_by[0]})" for g in found[:6])
        more = f" and {len(found) - 6} more" if len(found) > 6 else ""
        what = ("are pruned: the pruned model is not the original with those units zeroed (its proof is a "
                "smaller-config twin); PruneConfig(renormalising='exclude') leaves them whole"
                if cfg.renormalising == "allow" else "are left whole (renormalising='exclude')")
        warnings.warn(f"renormalising groups {names}{more} {what}", stacklevel=4)  # at the caller of plan()
    return [g.id for g in found]


def make_plan(dg: DependencyGraph, cfg: PruneConfig, scores: dict[int, torch.Tensor]) -> PrunePlan:
    """Choose the units to keep in each targeted group of `dg` from their `scores` (group id -> one score per unit)
    under `cfg`, and count the parameters left. Raises `PlanError` when nothing can be pruned or the ratio is missed
    by more than the tolerance."""
    from fxprune.rewrite.emit import kept_positions
    groups = target_groups(dg, cfg)
    if not groups:
        raise PlanError(f"no prunable groups for targets {cfg.targets}; frozen ops: {frozen_summary(dg)}")
    counts = select(dg, groups, scores, cfg)
    units = {}
    for g in groups:
        order = torch.argsort(scores[g.id].double(), descending=True, stable=True)
        units[g.id] = sorted(order[: counts[g.id]].tolist())
    atom_units = {dg.groups[gid].atom_id: u for gid, u in units.items() if len(u) < dg.groups[gid].n_units}
    kept = {n: {d: idx.tolist() for d, idx in dims.items()}
            for n, dims in kept_positions(dg, {a: torch.tensor(u) for a, u in atom_units.items()}).items()}
    after = dg.count_parameters({a: len(u) for a, u in atom_units.items()})
    if cfg.reconstruct.enabled:
        after += added_biases(dg, kept)
    before = dg.num_parameters()
    achieved = 1 - after / before
    if abs(achieved - cfg.ratio) > TOLERANCE:
        raise PlanError(
            f"ratio {cfg.ratio} cannot be met: the prunable structure for targets {cfg.targets} allows "
            f"{achieved:.4f} (tolerance {TOLERANCE}). Frozen ops: {frozen_summary(dg)}")
    return PrunePlan(cfg, {gid: u for gid, u in units.items() if len(u) < dg.groups[gid].n_units}, kept,
                     before, after, fingerprint(dg), {g.id: g.kind for g in groups}, renormalising_note(dg, cfg))


def added_biases(dg: DependencyGraph, kept: dict) -> int:
    """Parameters the reconstruction adds: a bias on each refitted projection that had none."""
    from fxprune.reconstruction.projections import dense_projections
    return sum(p.dense_weight.shape[0] if p.rows is None else len(p.rows)
               for p in dense_projections(dg.gm, dg.aliases, kept).values() if p.dense_bias is None)


def frozen_summary(dg: DependencyGraph) -> str:
    """The first frozen ops of `dg` as "node (op): why" text, or "none", for error messages."""
    if not dg.frozen_ops:
        return "none"
    return "; ".join(f"{n} ({op}): {why}" for n, op, why in dg.frozen_ops[:12])


def default_counts(dg: DependencyGraph, groups, scores, ratio: float) -> dict[int, int]:
    """Kept counts per group under the default settings at `ratio`: what HyWIA learns its fractions for."""
    return select(dg, groups, scores, PruneConfig(ratio=ratio))


register_planner(default_counts)
