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

from fxprune.data.calibration import Calibration
from fxprune.planning.config import PruneConfig
from fxprune.reconstruction.settings import Refit


def importance_needs_data(method) -> bool:
    """Whether `method` (settings or a name; unknown names raise here, before any slow work) reads data."""
    from fxprune.scoring import ESTIMATORS, HyWIA, as_method
    method = as_method(method, ESTIMATORS)
    return isinstance(method, HyWIA) or bool(getattr(ESTIMATORS.get(method.estimator), "needs", ()))


def resolve_data(model, cfg: PruneConfig, calibration: Calibration | None, tokenizer, scored: bool,
                 draw: bool = True) -> tuple[PruneConfig, Calibration | None]:
    """(config, calibration): the given calibration, the packaged sample, or a data-free config.

    `scored`: the caller has scores already; `draw=False`: only decide the config (no sample is drawn)."""
    wants_scores = not scored and importance_needs_data(cfg.importance)
    if calibration is not None or not (wants_scores or cfg.reconstruct.enabled):
        return cfg, calibration
    tok = find_tokenizer(model, tokenizer)
    if tok is not None:
        return cfg, (default_calibration(tok, cfg) if draw else None)
    changes = {"reconstruct": dataclasses.replace(cfg.reconstruct, mode="none")} if cfg.reconstruct.enabled else {}
    if wants_scores:
        changes["importance"] = "l2"
    warnings.warn(f"fxprune: no calibration and no tokenizer for {type(model).__name__}, so "
                  f"{', '.join(f'{k}={describe(getattr(cfg, k))!r}' for k in changes)} cannot run; using "
                  f"{', '.join(f'{k}={describe(v)!r}' for k, v in changes.items())} instead (quality suffers: pass "
                  "calibration= token ids or tokenizer=)", stacklevel=3)
    return dataclasses.replace(cfg, **changes), None


def find_tokenizer(model, tokenizer=None):
    """`tokenizer` if given, else the one found beside the model (None when there is none)."""
    from fxprune.data.models import tokenizer_for
    return tokenizer if tokenizer is not None else tokenizer_for(model)


def default_calibration(tokenizer, cfg: PruneConfig, samples: int | None = None) -> Calibration:
    """`samples` (default `cfg.calibration_samples`) windows of the packaged C4 sample, drawn with `cfg.seed`."""
    return Calibration.packaged(tokenizer, samples or cfg.calibration_samples, cfg.calibration_len, cfg.seed)


def describe(setting) -> str:
    """A setting as the user names it: a refit by its mode, anything else as it is."""
    return setting.mode if isinstance(setting, Refit) else setting
