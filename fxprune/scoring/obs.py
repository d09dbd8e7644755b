"""Refit-aware importance ("obs"): structured optimal brain surgeon on each projection's input units.

The reconstruction pass refits every projection over the inputs that remain, so the unit to remove
is not the one with the smallest output (Wanda-sp, FLAP) but the one the other inputs can best stand
in for. For a projection y = W x + b with calibration inputs x_t, H = sum_t w_t [x_t, 1][x_t, 1]^T (the
constant column is the refit's bias, never removed; w_t the refit's token weights, which keep the few
tokens with a huge residual stream, attention sinks, from ruling the choice) and
P = (H + damp * mean(diag H) I)^-1, removing the input positions S of a unit and refitting all the
others optimally leaves the output error

    err(S) = sum over output rows r of  W[r, S] (P[S, S])^-1 W[r, S]^T

(Kurtic et al., ZipLM, 2023; the same closed form as SparseGPT / SlimGPT's structured OBS). Units are
removed greedily, the cheapest first, and after each removal W takes the optimal update
W <- W - W[:, S] P[S, S]^-1 P[S, :] and P drops S (P <- P - P[:, S] P[S, S]^-1 P[S, :]), so a unit's
error is measured with the units removed before it already gone. To keep the loop short, each step
removes the cheapest 1/64 of the remaining units together (one unit per step below 128).

A unit's score is its error at the step it went, made increasing along the removal order (a running
maximum, raised by at least one float32 step per unit so that no two tie): keeping a projection's k
highest-scored units keeps what the greedy removal kept. Errors are of the residual stream as the next
norm sees it (the token weights' mean, `InputStats.weight_scale`, scaled back in), so scores of
different layers compare, and `allocation="absolute"` ranks them as they are, per parameter.

A member is scored only where it is the input dimension of a projection (o_proj over heads, down_proj
over channels); the other members of its group return None, as for flap and wanda.
"""
from __future__ import annotations

import torch

from fxprune.scoring.estimators import UnitStats, register_estimator

STEP_FRACTION = 64  # each greedy step removes max(1, remaining // STEP_FRACTION) units


def damped_inverse(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """(H + damp * mean(diag H) I)^-1, the mean over the input channels (not the constant column)."""
    h = gram.double().clone()
    h.diagonal().add_(damp * float(h.diagonal()[:-1].mean().clamp_min(1e-12)))
    return torch.cholesky_inverse(torch.linalg.cholesky(h))


def removal_errors(weight: torch.Tensor, inverse: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """err(S) for each row S of `positions` [units, width] (see the module docstring)."""
    block = inverse[positions[:, :, None], positions[:, None, :]]        # [units, width, width]
    ws = weight[:, positions].permute(1, 0, 2)                           # [units, out, width]
    return (torch.linalg.solve(block, ws.transpose(1, 2)).transpose(1, 2) * ws).sum((1, 2))


def greedy_scores(weight: torch.Tensor, gram: torch.Tensor, unit_of: torch.Tensor, n_units: int,
                  damp: float) -> torch.Tensor:
    """Per unit, its removal error at the greedy step it was removed (running maximum); 0 for units with
    no input position in this projection. `weight` [out, in]; `gram` [in + 1, in + 1], the last row and
    column the constant input; `unit_of` [in] maps positions to units."""
    w = torch.cat([weight.double(), weight.new_zeros(weight.shape[0], 1).double()], 1)
    inverse = damped_inverse(gram, damp)
    by_width: dict[int, list[int]] = {}
    where = {}
    for u in range(n_units):
        pos = (unit_of == u).nonzero().flatten()
        if pos.numel():
            where[u] = pos
            by_width.setdefault(pos.numel(), []).append(u)
    scores = torch.zeros(n_units, dtype=torch.float32)
    alive, level = set(where), -1.0
    while alive:
        errors = {}
        for width, units in by_width.items():
            units = [u for u in units if u in alive]
            if units:
                errs = removal_errors(w, inverse, torch.stack([where[u] for u in units]))
                errors.update(zip(units, errs.tolist()))
        chosen = sorted(errors, key=errors.get)[:max(1, len(alive) // STEP_FRACTION)]
        for u in chosen:  # in float32, the scores' dtype, one step up at least: no two units tie
            level = max(float(torch.tensor(errors[u], dtype=torch.float32)),
                        float(torch.nextafter(torch.tensor(level, dtype=torch.float32), torch.tensor(float("inf")))))
            scores[u] = level
        s = torch.cat([where[u] for u in chosen])
        rows = inverse[s]                                                 # [|S|, in + 1]
        solved = torch.linalg.solve(rows[:, s], rows)                    # P[S, S]^-1 P[S, :]
        w -= w[:, s] @ solved
        inverse -= rows.t() @ solved
        w[:, s] = 0
        inverse[s, :] = 0
        inverse[:, s] = 0
        alive -= set(chosen)
    return scores


@register_estimator("obs", needs=("inputs", "gram"))
def _obs(stats: UnitStats):
    """Refit-aware: the output error left by removing the unit once the kept inputs are refitted (greedy)."""
    inputs = stats.inputs
    if inputs is None or inputs.dim != stats.dim or inputs.gram is None:
        return None
    weight = stats.weight if stats.dim == 1 else stats.weight.t()  # [out, in]
    damp = getattr(stats.settings, "damp", 0.01)
    errors = greedy_scores(weight.cpu(), inputs.gram, stats.unit_of.cpu(), stats.n_units, damp)
    return (errors * inputs.weight_scale).to(stats.weight.device)  # errors of the normalised stream: all layers alike
