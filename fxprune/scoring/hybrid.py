"""`hywia`: hybrid-grained weight importance (HyWIA, Liu et al., arXiv 2403.10799), small and deterministic.

Per group g and granularity k in `HyWIA.granularities` (default all four):
  fine   = element1 (per-weight Taylor |W*G|, summed per unit, aggregated over members)
  coarse = vector   (structure-level Taylor |sum W*G| per member, aggregated)
  wanda  = wanda    (per-weight |W| * ||x||, activation-aware, summed per unit)
  flap   = flap     (structure-level input fluctuation Var(x) * ||W column||^2, activation-aware)
  n_k    = s_k / mean(s_k)      normalised per group: mean 1, ranks and non-negativity kept
Attention over the granularities, per group:
  phi_k  = log1p([std, max, min, f_g-quantile] of n_k)          (per-group statistics, fixed)
  key_k  = A phi_k + b + e_k                                     (A, b, e_k learned, shared)
  a      = softmax_k(<q[layer, kind], key_k> / sqrt(dim))        (q learned, one per layer+kind)
  s      = sum_k a_k * n_k                                       (the returned score)
Learning: keep mask per unit, for the fraction f_g of group g's units that the uniform planner
removes for the current scores when `ratio` of the parameters go (`planned_fractions`, recomputed
every step; protected layers and embeddings make f_g larger than `ratio`; `fractions` fixes it):
  soft   m_u = sigmoid((s_u - tau_g) / T_g), tau_g = the f_g-quantile of s, T_g = temperature * std(s)
  hard   (default) forward: m_u = 1 for the (1 - f_g) n_g best units by s, else 0 (the pruned model
         itself); backward: the gradient of the soft m_u (straight-through)
m scales the output-projection columns (o_proj / down_proj) of each unit of groups of kind heads /
kv_groups / group_heads / mlp; the parameters (q, A, b, e) minimise the LM loss of the masked
model by Adam(lr) for `steps` steps, one calibration chunk per step in order. q starts at 0
(equal weights); A is drawn from a generator seeded by `seed`, so the result is deterministic for
a seed. Groups of other kinds have no output projection to mask: their scores are blended with
the attention of their (layer, kind) query, which keeps its initial equal weights unless a
maskable group shares it.
Validation (`validate=True`): the learned blend and each corner of the attention (one granularity
alone, e.g. alpha_fine = 1: element1's ranking) prune the model (hard masks); the one with the lowest
LM loss on the held-out calibration rows (every target token weighted alike, `lm.mean_token_loss`) is returned (`validation` holds every loss, `choice` the
winner). The last `holdout` fraction of the calibration rows is kept out of the attention's training
for that (the gradients and activation statistics behind the granularities still use every row), so
the choice is not made on the rows the blend was fitted to. This masked validation is what `score` and
`hywia` do; `fxprune.plan`, when its plan refits the pruned projections, judges the same candidates
(`HyWIAResult.candidates`) after that refit instead (`fxprune.planning.refit_choice`, `HyWIA.after_refit`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fxprune.analysis.groups import DependencyGraph, Group, Member
from fxprune.util.lm import lm_loss, mean_token_loss
from fxprune.scoring.aggregate import AGGREGATIONS, estimate, resolve_groups
from fxprune.scoring.calibration import calibration_for
from fxprune.scoring.estimators import ESTIMATORS
from fxprune.scoring.forward import compute_device, forward, model_tensors
from fxprune.scoring.activations import input_statistics
from fxprune.scoring.gradients import GradientStats, gradients_for, member_names
from fxprune.scoring.methods import HYWIA_GRANULARITIES as GRANULARITIES, HyWIA

MASKABLE_KINDS = ("heads", "kv_groups", "group_heads", "mlp")
VALIDATION_ROWS = 8  # held-out rows per forward pass of a validation (memory, not the result: the mean is per token)


def output_projection_members(dg: DependencyGraph, group: Group) -> list[Member]:
    """Members whose zeroing removes a unit's contribution exactly: the columns (last dim) of the 2-D
    weights of heads / kv_groups / group_heads / mlp groups (o_proj, down_proj)."""
    if group.kind not in MASKABLE_KINDS:
        return []
    out = []
    for m in group.members:
        t = dg.parameters.get(m.name)
        if t is not None and t.dim() == 2 and m.dim == t.dim() - 1:
            out.append(m)
    return out


@dataclass
class HyWIAResult:
    """What `hywia` returns: the blended `scores` per group, the learned weights `alpha` of each granularity, the
    granularity scores, and the validation's choice and held-out losses."""
    scores: dict[int, torch.Tensor]          # blended, with the learned attention (or the validated corner)
    alpha: dict[int, torch.Tensor]           # per group: the weight of each granularity, in `granularities` order
    levels: dict[str, dict[int, torch.Tensor]]  # per granularity: the normalised scores
    losses: list[float] = field(default_factory=list)  # masked LM loss at each step
    validation: dict = field(default_factory=dict)     # held-out loss of the pruned model: "learned" and each corner
    choice: str = "learned"                  # what was returned: "learned" or the winning corner's granularity
    learned: dict[int, torch.Tensor] = field(default_factory=dict)  # the learned blend, whatever was returned

    def candidates(self) -> dict[str, dict[int, torch.Tensor]]:
        """What a validation chooses from: the learned blend and each granularity alone (a corner)."""
        return {"learned": self.learned or self.scores, **self.levels}

    @property
    def granularities(self) -> tuple[str, ...]:
        """The granularities blended, in the order of `alpha`."""
        return tuple(self.levels)


def _normalise(s: torch.Tensor) -> torch.Tensor:
    return s / s.mean().clamp_min(1e-12)


def _features(n: torch.Tensor, ratio: float) -> torch.Tensor:
    """Statistics of one group's normalised scores (mean is 1 by construction): spread and shape."""
    q = torch.quantile(n, ratio) if n.numel() > 1 else n.min()
    std = n.std() if n.numel() > 1 else n.new_zeros(())
    return torch.log1p(torch.stack([std, n.max(), n.min(), q]).clamp_min(0))


def planned_fractions(dg: DependencyGraph, groups, ratio: float, scores=None) -> dict[int, float]:
    """Per group, the fraction of its units that the (uniform) planner removes for these `scores` when
    `ratio` of the parameters go. It exceeds `ratio` (embeddings, norms and protected layers stay),
    and where one fraction for all groups cannot meet the ratio, the planner's top-up by score decides
    which groups give more (so it depends on `scores`; equal scores when None)."""
    if _PLANNER is None:
        raise RuntimeError("no planner registered: import fxprune (fxprune.planning registers its default planner)")
    scores = scores or {g.id: torch.ones(g.n_units) for g in groups}
    counts = _PLANNER(dg, groups, scores, ratio)
    return {g.id: 1 - counts[g.id] / g.n_units for g in groups}


# The default planner's kept counts per group, (dg, groups, scores, ratio) -> {group id: count}. Planning
# registers it, since planning depends on scoring and not the other way round.
_PLANNER = None


def register_planner(planner) -> None:
    """Make `planner(dg, groups, scores, ratio) -> {group id: kept count}` the one HyWIA learns its fractions for."""
    global _PLANNER
    _PLANNER = planner


def check_arguments(ratio: float, aggregation: str) -> None:
    """Raise ValueError for a ratio outside (0, 1) or an unknown aggregation (before any slow work)."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio (the fraction of parameters the plan removes) must be in (0, 1), got {ratio}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")


def hywia(dg: DependencyGraph, groups=None, calibration=None, ratio: float = 0.2, aggregation: str = "sum",
          seed: int = 0, steps: int = 30, lr: float = 0.05, temperature: float = 0.25, dim: int = 8,
          batch_size: int = 1, device=None, dtype=None, checkpoint: bool = False,
          gradients: GradientStats | None = None, relaxation: str = "hard", fractions: dict | None = None,
          validate: bool = True, settings: HyWIA | None = None, inputs: dict | None = None, weights=None,
          objective: "MaskedObjective | None" = None) -> HyWIAResult:
    """Hybrid-grained weight importance of `groups` (default: all) learned on `calibration`, for a plan
    that removes `ratio` of the parameters; the method is in this module's docstring.

    `settings` (a `HyWIA`) overrides steps, lr, temperature, dim, relaxation and validate; `fractions`
    fixes the per-group fractions f_g; `gradients` reuses a `compute_gradients` result and `inputs` an
    `activations.input_statistics` result (for the activation-aware granularities); `weights` (name ->
    tensor) is read in place of `dg.parameters` and `objective` runs the masked model in place of the in-memory
    graph (`fxprune.streaming` hands its streamed ones, with the gradients and inputs it computed).
    See docs/hywia.md for the reasons behind these choices.
    """
    check_arguments(ratio, aggregation)
    settings = settings or HyWIA(steps=steps, lr=lr, temperature=temperature, dim=dim, relaxation=relaxation,
                                 validate=validate)
    if settings.after_refit and settings.validate:
        raise ValueError("HyWIA(after_refit=True) judges its candidates after the plan's refit, which only "
                         "fxprune.plan makes: call fxprune.plan(model, ratio, importance=HyWIA(after_refit=True)), "
                         "or score with HyWIA(after_refit=False)")
    calibration = calibration_for(dg, calibration, "hywia (it learns its attention on the LM loss)")
    groups = resolve_groups(dg, groups)
    device = compute_device(dg, device)
    kinds = settings.granularities
    grads = None
    if {"fine", "coarse"} & set(kinds):
        grads = gradients_for(dg, groups, frozenset({"grad"}), "hywia", calibration, gradients, batch_size, device,
                              dtype, checkpoint)
    if {"wanda", "flap"} & set(kinds) and inputs is None:
        inputs = input_statistics(dg, calibration, member_names(dg, groups))
    levels = {}
    for k in kinds:
        raw = estimate(dg, groups, ESTIMATORS[GRANULARITIES[k]], aggregation, grads, seed, device, None, inputs,
                       weights)
        levels[k] = {g.id: _normalise(raw[g.id]) for g in groups}
    del grads, inputs  # a full set of gradients: not kept through the training and validation
    train, held_out = calibration.split_holdout(calibration.held_out_rows(settings.holdout))
    samples = list(train.batches(max(batch_size, 1)))
    masker = _Masker(dg, groups, ratio, fractions, settings.temperature, device)
    objective = objective or InMemoryObjective(dg, device, dtype, checkpoint)
    first = levels[kinds[0]]
    attention = _Attention(groups, levels, masker.fractions_for(lambda g: first[g.id]), settings.dim, seed)
    losses = _train(attention, masker, samples, settings, device, objective)
    with torch.no_grad():
        scores = learned = {g.id: attention.blended(g).detach().cpu() for g in groups}
        alpha = {g.id: attention.weights(g).detach().cpu() for g in groups}
        validation, choice = {}, "learned"
        if settings.validate and masker.maskable and samples:
            # The relaxation can settle on a blend that prunes worse than one granularity alone (a corner of
            # the attention); keep whichever prunes with the lowest loss on the held-out rows.
            pieces = list((held_out or train).batches(VALIDATION_ROWS, device))
            candidates = {"learned": scores, **levels}
            for name, cand in candidates.items():
                validation[name] = objective.held_out(masker.column_masks(lambda g: cand[g.id], "hard"), pieces)
            choice = min(validation, key=lambda k: (validation[k], k != "learned"))
            if choice != "learned":
                scores = {g.id: levels[choice][g.id].clone() for g in groups}
                corner = torch.tensor([float(k == choice) for k in kinds])
                alpha = {g.id: corner.clone() for g in groups}
    return HyWIAResult(scores, alpha, levels, losses, validation, choice, learned)


def _train(attention, masker, samples, settings: HyWIA, device, objective: "MaskedObjective") -> list[float]:
    """Adam steps on the LM loss of the masked model, one calibration chunk per step in order."""
    losses = []
    if not (masker.maskable and samples and settings.steps > 0):
        return losses
    opt = torch.optim.Adam(attention.learnables, lr=settings.lr)
    for step in range(settings.steps):
        ids, attn = (t.to(device) for t in samples[step % len(samples)])
        opt.zero_grad()
        loss = objective.step(masker.column_masks(attention.blended, settings.relaxation), ids, attn)
        opt.step()
        losses.append(loss)
    return losses


class _Attention:
    """The learned attention over the granularities: one query per (layer, kind), shared keys."""

    def __init__(self, groups, levels: dict, frac, dim: int, seed: int):
        self.levels, self.dim = list(levels.values()), dim
        gen = torch.Generator().manual_seed(int(seed))
        self.feats = {g.id: torch.stack([_features(n[g.id], frac[g.id]) for n in self.levels]) for g in groups}
        n_feat = 4
        self.A = (torch.randn(dim, n_feat, generator=gen) / math.sqrt(n_feat)).requires_grad_(True)
        self.b = torch.zeros(dim, requires_grad=True)
        self.e = torch.zeros(len(self.levels), dim, requires_grad=True)
        self.queries = {k: torch.zeros(dim, requires_grad=True) for k in dict.fromkeys(self.slot(g) for g in groups)}
        self.learnables = [self.A, self.b, self.e, *self.queries.values()]

    @staticmethod
    def slot(g: Group) -> str:
        return f"{g.layer}:{g.kind}"

    def weights(self, g: Group) -> torch.Tensor:
        keys = self.feats[g.id] @ self.A.T + self.b + self.e
        return torch.softmax(keys @ self.queries[self.slot(g)] / math.sqrt(self.dim), dim=0)

    def blended(self, g: Group) -> torch.Tensor:
        a = self.weights(g)
        return sum(a[i] * n[g.id] for i, n in enumerate(self.levels))


class MaskedObjective:
    """How HyWIA runs its masked model. `masks`: {weight name: column mask} (the member dim is the last one),
    differentiable in the attention's learnables, each multiplying its weight's columns."""

    def step(self, masks: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor) -> float:
        """The LM loss of one training chunk under `masks`, backpropagated into them (`.backward()`)."""
        raise NotImplementedError

    def held_out(self, masks: dict[str, torch.Tensor], batches: list) -> float:
        """`lm.mean_token_loss` of the model under `masks` over the (ids, mask) `batches`."""
        raise NotImplementedError


class InMemoryObjective(MaskedObjective):
    """The masked model as detached copies of the analysed model's tensors, run by `forward`."""

    def __init__(self, dg, device, dtype, checkpoint):
        self.dg, self.device, self.dtype, self.checkpoint = dg, device, dtype, checkpoint
        self._base = None

    def masked(self, masks) -> dict[str, torch.Tensor]:
        if self._base is None:
            self._base = model_tensors(self.dg, self.device, self.dtype)
        tensors = dict(self._base)
        for name, cm in masks.items():
            tensors[name] = self._base[name] * cm.to(self._base[name].dtype)
        return tensors

    def step(self, masks, ids, mask):
        loss = lm_loss(forward(self.dg, self.masked(masks), ids, mask, self.checkpoint), ids, mask)
        loss.backward()
        return float(loss.detach())

    def held_out(self, masks, batches):
        tensors = self.masked(masks)
        return mean_token_loss(lambda ids, mask: forward(self.dg, tensors, ids, mask, self.checkpoint), batches)


class _Masker:
    """Column masks of each maskable group's units at their output projection."""

    def __init__(self, dg, groups, ratio, fractions, temperature, device):
        self.dg, self.groups, self.ratio, self.fractions = dg, groups, ratio, fractions
        self.temperature, self.device = temperature, device
        maskable = [(g, output_projection_members(dg, g)) for g in groups]
        self.maskable = [(g, ms) for g, ms in maskable if ms and g.n_units > 1]

    def fractions_for(self, score_of) -> dict[int, float]:
        if self.fractions is not None:
            return self.fractions
        return planned_fractions(self.dg, self.groups, self.ratio,
                                 {g.id: score_of(g).detach().cpu() for g in self.groups})

    def unit_mask(self, s: torch.Tensor, fraction: float, relax: str) -> torch.Tensor:
        """Keep mask of one group's units: the sigmoid around the `fraction`-quantile, or (hard) the
        planner's kept set in the forward pass with the sigmoid's gradient (straight-through)."""
        tau = torch.quantile(s, fraction)
        T = self.temperature * s.detach().std().clamp_min(1e-6)
        m = torch.sigmoid((s - tau) / T)
        if relax == "hard":
            keep = torch.zeros_like(m)
            order = s.detach().double().argsort(descending=True, stable=True)  # the planner's order
            keep[order[: s.numel() - round(fraction * s.numel())]] = 1
            m = keep + m - m.detach()
        return m

    def column_masks(self, score_of, relax: str) -> dict[str, torch.Tensor]:
        """{weight name: column mask}, as many units masked per group as the planner removes for the scores
        `score_of(group)`."""
        frac = self.fractions_for(score_of)
        device = self.device
        col_masks: dict[str, torch.Tensor] = {}
        for g, members in self.maskable:
            m = self.unit_mask(score_of(g), frac[g.id], relax)
            for mem in members:
                unit_of = mem.unit_of.to(device)
                per_col = torch.where(unit_of >= 0, m.to(device)[unit_of.clamp_min(0)], torch.ones((), device=device))
                col_masks[mem.name] = col_masks.get(mem.name, 1) * per_col
        return col_masks
