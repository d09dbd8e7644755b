"""Where calibration comes from when the user gives none, and what a call falls back to without it.

`fxprune.compile(model)` must be good with nothing else given: settings that need calibration text
(activation- or gradient-based importance, reconstruction) draw it from the C4 sample shipped in the
package, tokenised with the model's tokenizer. When no tokenizer can be found either, those settings
fall back to data-free ones (l2 importance, no reconstruction) with a warning, and the plan's config
records what was really used.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch

from fxprune.planning.config import PruneConfig


def importance_needs_data(method) -> bool:
    """Whether `method` (settings or a name; unknown names raise here, before any slow work) reads data."""
    from fxprune.scoring import ESTIMATORS, HyWIA, as_method
    method = as_method(method, ESTIMATORS)
    return isinstance(method, HyWIA) or bool(getattr(ESTIMATORS.get(method.estimator), "needs", ()))


def resolve_data(model, cfg: PruneConfig, calibration, tokenizer, scored: bool, draw: bool = True):
    """(config, calibration): the given calibration, the packaged sample, or a data-free config.

    `scored`: the caller has scores already; `draw=False`: only decide the config (no sample is drawn)."""
    wants_scores = not scored and importance_needs_data(cfg.importance)
    if calibration is not None or not (wants_scores or cfg.reconstruct != "none"):
        return cfg, calibration
    tok = find_tokenizer(model, tokenizer)
    if tok is not None:
        return cfg, (default_calibration(tok, cfg) if draw else None)
    changes = {"reconstruct": "none"} if cfg.reconstruct != "none" else {}
    if wants_scores:
        changes["importance"] = "l2"
    warnings.warn(f"fxprune: no calibration and no tokenizer for {type(model).__name__}, so "
                  f"{', '.join(f'{k}={getattr(cfg, k)!r}' for k in changes)} cannot run; using "
                  f"{', '.join(f'{k}={v!r}' for k, v in changes.items())} instead (quality suffers: pass "
                  "calibration= token ids or tokenizer=)", stacklevel=3)
    return dataclasses.replace(cfg, **changes), None


def find_tokenizer(model, tokenizer=None):
    """`tokenizer` if given, else the one found beside the model (None when there is none)."""
    from fxprune.data.models import tokenizer_for
    return tokenizer if tokenizer is not None else tokenizer_for(model)


def default_calibration(tokenizer, cfg: PruneConfig, samples: int | None = None) -> torch.Tensor:
    """`samples` (default `cfg.calibration_samples`) windows of the packaged C4 sample, drawn with `cfg.seed`."""
    from fxprune.data.loaders import PACKAGED_C4, calibration_samples
    return calibration_samples(PACKAGED_C4, tokenizer, samples or cfg.calibration_samples, cfg.calibration_len,
                               cfg.seed)


def calibration_batch(calibration) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All calibration batches as one (input_ids, attention_mask) pair, right-padded to one length."""
    from fxprune.data.calibration import batches as validated
    batches = validated(calibration)
    if len({ids.shape[1] for ids, _ in batches}) == 1 and all(m is None for _, m in batches):
        return torch.cat([ids for ids, _ in batches]), None
    length = max(ids.shape[1] for ids, _ in batches)
    ids = torch.zeros(sum(i.shape[0] for i, _ in batches), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    row = 0
    for i, m in batches:
        ids[row:row + i.shape[0], :i.shape[1]] = i
        mask[row:row + i.shape[0], :i.shape[1]] = 1 if m is None else m
        row += i.shape[0]
    return ids, mask
