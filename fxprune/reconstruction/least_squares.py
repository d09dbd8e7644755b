"""The refit's algebra: weighted sums over tokens (`Stats`), the ridge solve towards the sliced weight (`solve`),
and the choice among candidates on held-out tokens (`choose`, `fit`). See reconstruct_layers.py for the model."""
from __future__ import annotations

import torch

from fxprune.reconstruction.settings import AUTO

RIDGES = (0.01, 0.1, 0.3, 1.0, 3.0)  # the strengths ridge="auto" chooses among (x the mean input energy)


class Stats:
    """Weighted sums over tokens of the pruned input x and the dense target y = X_d W_d^T + b_d, enough to
    solve any ridge refit and to score any (W, b) on these tokens; adding two gives the union's sums."""

    def __init__(self, xp, y, w):
        # The token-long products in float32 (they are most of the pass's time), kept and solved in float64.
        xp, y, w = xp.float(), y.float(), w.float()
        xw = xp * w[:, None]
        self.sw, self.sx, self.sy = float(w.double().sum()), xw.double().sum(0), (y * w[:, None]).double().sum(0)
        self.sxx, self.sxy = (xw.t() @ xp).double(), (xw.t() @ y).double()
        self.syy = float((y.double().pow(2) * w.double()[:, None]).sum())

    def __add__(self, other):
        total = object.__new__(Stats)
        for k in ("sw", "sx", "sy", "sxx", "sxy", "syy"):
            setattr(total, k, getattr(self, k) + getattr(other, k))
        return total

    def scale_(self, factor: float) -> "Stats":
        """Itself, its sums made those of every token weight multiplied by `factor` (they are linear in the
        weights); in place, since the widest projection's sums are large."""
        for k in ("sw", "sx", "sy", "sxx", "sxy", "syy"):
            setattr(self, k, getattr(self, k) * factor)
        return self

    def centred(self):
        mx, my = self.sx / self.sw, self.sy / self.sw
        return mx, my, self.sxx - self.sw * torch.outer(mx, mx), self.sxy - self.sw * torch.outer(mx, my)

    def error(self, weight, bias):
        """sum_t w_t ||x_t W^T + b - y_t||^2."""
        return float(((weight @ self.sxx) * weight).sum() - 2 * (weight * self.sxy.t()).sum() + self.syy
                     + 2 * bias @ (weight @ self.sx - self.sy) + self.sw * bias @ bias)


def solve(stats: Stats, w0: torch.Tensor, mode: str, ridge: float):
    """(weight, bias) minimising the weighted error on `stats` (+ ridge pull towards w0 for "lstsq")."""
    mx, my, gram, cross = stats.centred()
    if mode == "lstsq":
        lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
        rhs = cross + lam * w0.t()
        if lam == 0:
            w0 = torch.linalg.lstsq(gram, rhs).solution.t()
        else:
            gram.diagonal().add_(lam)  # gram + lam I in place: `centred` made it for this call; it is inputs^2 large
            w0 = torch.linalg.solve(gram, rhs).t()
    return w0, my - w0 @ mx


def choose(train: Stats, test: Stats | None, w0, b0, mode: str, ridge):
    """(weight, bias, choice) from the sums: with a fixed `ridge`, the solve on `train` (all tokens, `test` None);
    with ridge="auto", each candidate (the projection as it is, the bias alone, the ridge refit at each strength
    of RIDGES) fitted on `train` and scored on `test`, the best refitted on both (keeping the projection as it is
    when nothing beats it). `w0`, `b0`: the sliced weight and bias (None: no bias)."""
    w0 = w0.double()
    b0 = torch.zeros(w0.shape[0], dtype=torch.float64) if b0 is None else b0.double()
    if ridge != AUTO:
        weight, bias = solve(train, w0, mode, ridge)
        return weight, bias, mode
    candidates = {"keep": (w0, b0), "bias": solve(train, w0, "bias", 0.0)}
    if mode == "lstsq":
        candidates.update({f"lstsq:{r:g}": solve(train, w0, "lstsq", r) for r in RIDGES})
    errors = {k: test.error(*c) for k, c in candidates.items()}
    choice = min(errors, key=errors.get)
    if errors[choice] >= errors["keep"] - 1e-9 * max(test.syy, 1e-30):  # no measurable gain: change nothing
        choice = "keep"
    if choice == "keep":
        return w0, b0, choice
    kind, _, strength = choice.partition(":")
    weight, bias = solve(train + test, w0, kind, float(strength or 0))
    return weight, bias, choice


def fit(xp, y, w0, b0, mode: str, ridge, weights=None, held_out=None):
    """(weight, bias, choice) of the refitted projection: pruned inputs `xp` [tokens, kept inputs], target `y`
    [tokens, kept outputs] (the dense projection's output), token `weights` (ones when None); ridge="auto"
    holds out the tokens where `held_out` is true to choose the candidate (`choose`)."""
    weights = torch.ones(xp.shape[0], dtype=torch.float64) if weights is None else weights.double()
    if ridge != AUTO:
        return choose(Stats(xp.float(), y, weights), None, w0, b0, mode, ridge)
    fit_rows = ~held_out
    train = Stats(xp[fit_rows].float(), y[fit_rows], weights[fit_rows])
    test = Stats(xp[held_out].float(), y[held_out], weights[held_out])
    return choose(train, test, w0, b0, mode, ridge)
