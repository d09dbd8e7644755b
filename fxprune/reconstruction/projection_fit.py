"""One projection's refit accumulated over calibration batches: its targets and token weights from the values
the dense and the pruned graph hold before it, summed batch by batch (`Stats` adds), then solved once.

The in-memory pass adds the whole calibration as one batch; the streamed refit (fxprune/streaming/refit.py)
adds one batch at a time, so both solve the same sums.
"""
from __future__ import annotations

import torch

from fxprune.reconstruction.least_squares import Stats, choose
from fxprune.reconstruction.projections import Projection, inverse_energy, stream_like
from fxprune.reconstruction.settings import AUTO, Refit


def held_out_tokens(mask: torch.Tensor, first_row: int = 0, first_token: int = 0,
                    total_rows: int | None = None) -> torch.Tensor:
    """Which real tokens of `mask` [rows, seq] ridge="auto" holds out, as a bool per real token in row-major
    order: those of every fourth calibration row, or every fourth token when the calibration has fewer than four
    rows. `mask` may be a batch: rows `first_row`.. of a calibration of `total_rows` rows (its own rows when
    None) with `first_token` real tokens before it."""
    total_rows = mask.shape[0] if total_rows is None else total_rows
    tokens = mask.reshape(-1).bool()
    rows = (torch.arange(mask.shape[0]) + first_row).repeat_interleave(mask.shape[1])[tokens]
    return rows % 4 == 3 if total_rows >= 4 else (torch.arange(rows.numel()) + first_token) % 4 == 3


class ProjectionFit:
    """The sums of `proj`'s refit under `settings` (a `Refit`), added batch by batch (`add`) and solved once
    (`result`). Token weights are 1 / the dense stream's energy (`inverse_energy`) normalised to mean 1 over
    every token added: the sums are linear in the weights, so they are scaled once at the end."""

    def __init__(self, proj: Projection, settings: Refit):
        self.proj, self.settings = proj, settings
        self.train: Stats | None = None
        self.test: Stats | None = None
        self.tokens, self.energy = 0, 0.0

    @property
    def kept_outputs(self) -> int:
        return self.proj.dense_weight.shape[0] if self.proj.rows is None else len(self.proj.rows)

    def add(self, xd, residual, xp, own_residual, tokens: torch.Tensor, held_out: torch.Tensor | None) -> None:
        """Add one batch: `xd`, `xp` the dense and the pruned projection's inputs (as the graphs hold them),
        `residual`, `own_residual` the values their outputs are added to (None: none, or target "output"),
        `tokens` a bool per position of the batch (its real tokens), `held_out` a bool per real token
        (`held_out_tokens`; read with ridge="auto" only)."""
        proj, cfg = self.proj, self.settings
        residual = stream_like(residual, xd.numel() // xd.shape[-1], proj.dense_weight.shape[0])
        own_residual = stream_like(own_residual, xp.numel() // xp.shape[-1], self.kept_outputs)
        xp, xd = xp.reshape(-1, xp.shape[-1])[tokens], xd.reshape(-1, xd.shape[-1])[tokens]
        residual = None if residual is None else residual[tokens]
        own_residual = None if own_residual is None else own_residual[tokens]
        dense_out = proj.output(xd)  # all rows: the residual stream's weights need the whole output
        y = proj.kept_rows(dense_out)
        if own_residual is not None and residual is not None:
            # "stream": the output that makes the pruned stream after the add equal the dense one, so the fit
            # also takes back what earlier layers' pruning left in the stream (as far as x predicts it)
            y = y - (own_residual.float() - proj.kept_rows(residual).float())
        weights = inverse_energy(dense_out, residual if cfg.weighting == "residual" else None).to(xp.device)
        self.tokens += weights.numel()
        self.energy += float(weights.sum())
        if cfg.ridge == AUTO:
            self.train = _plus(self.train, Stats(xp[~held_out].float(), y[~held_out], weights[~held_out]))
            self.test = _plus(self.test, Stats(xp[held_out].float(), y[held_out], weights[held_out]))
        else:
            self.train = _plus(self.train, Stats(xp.float(), y, weights))

    def result(self, w0: torch.Tensor, b0: torch.Tensor | None):
        """(weight, bias, choice) of the refit from the sliced weight `w0` and bias `b0` (None: none); once, after
        the last batch."""
        if self.train is None:
            raise ValueError(f"the refit of {self.proj.weight} saw no calibration token")
        scale = self.tokens / self.energy  # weights of mean 1 over all tokens
        train, test, self.train, self.test = self.train, self.test, None, None
        test = None if test is None else test.scale_(scale)
        return choose(train.scale_(scale), test, w0, b0, self.settings.mode, self.settings.ridge)


def _plus(total: Stats | None, more: Stats) -> Stats:
    return more if total is None else total + more
